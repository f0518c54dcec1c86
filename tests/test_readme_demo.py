"""The README's offline demo, run exactly as written by a newcomer on a fresh machine.

The commands are read from README.md (so the two cannot drift apart) and run as subprocesses
through the project's `./run`, in an empty directory with a fresh `HOME`, `PREFECT_HOME` and
`SKINSENSE_HOME`: the first start of Prefect's temporary server, the first MLflow store and
the first app included (`bench/readme_demo.py` does the running, and times it there). The run
must end with the deployed app answering a real example.

Only the app's port is the test's own (`SKINSENSE_APP_PORT`, which the CLI reads when
`--port` is not given), so that a developer's app on 7860 does not get in the way.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from skinsense.serving.deploy import check_prediction, health, stop_app

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from readme_demo import README, readme_demo_commands, run_demo  # noqa: E402


def test_the_demo_commands_are_found():
    commands = readme_demo_commands(README.read_text())
    assert [shlex.split(c)[:2] for c in commands] == [["./run", "synth"], ["./run", "pipeline"]]
    with pytest.raises(ValueError, match="no heading"):
        readme_demo_commands("# A README without the demo\n")


@pytest.mark.slow
@pytest.mark.e2e
def test_the_readme_demo_runs_as_written_on_a_fresh_machine(tmp_path, free_port):
    try:
        run = run_demo(tmp_path, free_port)
        url = f"http://127.0.0.1:{free_port}"
        result = run.result
        assert result["app_url"] == url and result["promoted"] is True
        assert health(url)["version"] == result["version"]
        assert check_prediction(url)  # a real HAM10000 example, through gradio_client
        # The demo shows a comparison: the best model is good but not perfect, and the
        # second clearly learns too (chance is 1/7 = 0.14).
        scores = {arch: m["balanced_accuracy"] for arch, m in result["metrics"].items()}
        best, second = sorted(scores.values(), reverse=True)[:2]
        assert 0.6 <= best <= 0.95, scores
        assert second > 0.4, scores
        # Prefect ran in the newcomer's own (new) PREFECT_HOME.
        assert Path(run.env["PREFECT_HOME"], "prefect.db").is_file()
    finally:
        stop_app(tmp_path / "skinsense" / "app")
