"""The feedback store's first schema: raters, generations, ratings, comparisons and the feed.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

KEY = 255  # models.KEY_LENGTH at the time of this revision (a migration never imports the live models)


def _key_created() -> list:
    return [sa.Column("key", sa.String(KEY), nullable=False),
            sa.Column("created", sa.DateTime(timezone=True), nullable=False)]


def upgrade() -> None:
    for create in (_raters, _generations, _ratings, _comparisons, _feed):
        create()


def _raters() -> None:
    op.create_table(
        "raters",
        sa.Column("id", sa.String(KEY), nullable=False),
        sa.Column("role", sa.String(64), nullable=False),
        sa.Column("qualification", sa.Text(), nullable=False),
        *_key_created(),
        sa.PrimaryKeyConstraint("id", name="pk_raters"),
        sa.UniqueConstraint("key", name="uq_raters_key"),
    )


def _generations() -> None:
    op.create_table(
        "generations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("findings", sa.JSON(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("sampler", sa.JSON(), nullable=False),
        sa.Column("model_version", sa.String(KEY), nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("image_location", sa.String(KEY), nullable=False),
        *_key_created(),
        sa.PrimaryKeyConstraint("id", name="pk_generations"),
        sa.UniqueConstraint("key", name="uq_generations_key"),
    )
    op.create_index("ix_generations_image_sha256", "generations", ["image_sha256"])


def _ratings() -> None:
    op.create_table(
        "ratings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("generation_id", sa.Integer(), nullable=False),
        sa.Column("rater_id", sa.String(KEY), nullable=False),
        sa.Column("plausible", sa.Boolean(), nullable=False),
        sa.Column("failed", sa.JSON(), nullable=False),
        sa.Column("score", sa.SmallInteger(), nullable=True),
        sa.Column("comment", sa.Text(), nullable=False),
        *_key_created(),
        sa.CheckConstraint("score IS NULL OR (score >= 1 AND score <= 5)", name="ck_ratings_score_range"),
        sa.ForeignKeyConstraint(["generation_id"], ["generations.id"], name="fk_ratings_generation_id_generations"),
        sa.ForeignKeyConstraint(["rater_id"], ["raters.id"], name="fk_ratings_rater_id_raters"),
        sa.PrimaryKeyConstraint("id", name="pk_ratings"),
        sa.UniqueConstraint("key", name="uq_ratings_key"),
    )
    op.create_index("ix_ratings_generation_id", "ratings", ["generation_id"])
    op.create_index("ix_ratings_rater_id", "ratings", ["rater_id"])


def _comparisons() -> None:
    op.create_table(
        "comparisons",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("generation_a", sa.Integer(), nullable=False),
        sa.Column("generation_b", sa.Integer(), nullable=False),
        sa.Column("preferred", sa.String(3), nullable=False),
        sa.Column("rater_id", sa.String(KEY), nullable=False),
        *_key_created(),
        sa.CheckConstraint("preferred IN ('a', 'b', 'tie')", name="ck_comparisons_preferred_choice"),
        sa.CheckConstraint("generation_a <> generation_b", name="ck_comparisons_two_generations"),
        sa.ForeignKeyConstraint(["generation_a"], ["generations.id"],
                                name="fk_comparisons_generation_a_generations"),
        sa.ForeignKeyConstraint(["generation_b"], ["generations.id"],
                                name="fk_comparisons_generation_b_generations"),
        sa.ForeignKeyConstraint(["rater_id"], ["raters.id"], name="fk_comparisons_rater_id_raters"),
        sa.PrimaryKeyConstraint("id", name="pk_comparisons"),
        sa.UniqueConstraint("key", name="uq_comparisons_key"),
    )
    for col in ("generation_a", "generation_b", "rater_id"):
        op.create_index(f"ix_comparisons_{col}", "comparisons", [col])


def _feed() -> None:
    op.create_table(
        "feed",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("record_id", sa.String(KEY), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_feed"),
        sa.UniqueConstraint("kind", "record_id", name="uq_feed_kind_record_id"),
    )


def downgrade() -> None:
    for table in ("feed", "comparisons", "ratings", "generations", "raters"):
        op.drop_table(table)
