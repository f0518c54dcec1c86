#!/bin/sh
# The Prefect worker of the compose stack: creates the work pool, the `gpu` concurrency limit
# and the deployments (docker/prefect.compose.yaml), then runs flows on this container's GPU.
set -eu
cd /opt/skinsense

until python -c "import urllib.request,os; urllib.request.urlopen(os.environ['PREFECT_API_URL'] + '/health', timeout=3)" 2>/dev/null; do
  echo "waiting for the Prefect server at $PREFECT_API_URL"; sleep 3
done

prefect work-pool inspect skinsense-gpu >/dev/null 2>&1 \
  || prefect work-pool create skinsense-gpu --type process
python -c "from deployments.concurrency import ensure_gpu_limit; print('gpu slots:', ensure_gpu_limit())"
prefect --no-prompt deploy --all --prefect-file docker/prefect.compose.yaml

exec prefect worker start --pool skinsense-gpu --type process --name "worker-$(hostname)"
