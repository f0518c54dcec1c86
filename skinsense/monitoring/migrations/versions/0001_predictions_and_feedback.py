"""The prediction log and the confirmed diagnoses.

Revision ID: 0001
Revises:
Create Date: 2026-12-04
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "predictions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("endpoint", sa.String(32), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("model_name", sa.String(200)),
        sa.Column("model_version", sa.String(50)),
        sa.Column("backend", sa.String(50)),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("width", sa.Integer),
        sa.Column("height", sa.Integer),
        sa.Column("quality_issue", sa.String(200)),
        sa.Column("gate_status", sa.String(16)),
        sa.Column("in_domain", sa.Boolean),
        sa.Column("ood_score", sa.Float),
        sa.Column("probabilities", sa.JSON),
        sa.Column("top_class", sa.String(16)),
        sa.Column("referral", sa.Boolean),
        sa.Column("referral_score", sa.Float),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("image_path", sa.String(500)),
    )
    op.create_index("ix_predictions_created_at", "predictions", ["created_at"])
    op.create_index("ix_predictions_outcome", "predictions", ["outcome"])
    op.create_index("ix_predictions_image_sha256", "predictions", ["image_sha256"])
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("lesion_id", sa.String(100), nullable=False),
        sa.Column("dx", sa.String(16), nullable=False),
        sa.Column("dx_type", sa.String(16), nullable=False),
        sa.Column("age", sa.Float),
        sa.Column("sex", sa.String(16)),
        sa.Column("localization", sa.String(50)),
        sa.Column("entered_by", sa.String(200), nullable=False),
        sa.Column("image_path", sa.String(500)),
    )
    op.create_index("ix_feedback_created_at", "feedback", ["created_at"])
    op.create_index("ix_feedback_lesion_id", "feedback", ["lesion_id"])


def downgrade() -> None:
    op.drop_table("feedback")
    op.drop_table("predictions")
