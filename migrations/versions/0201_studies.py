"""whole studies: the studies table (shared/service/db.py Study; API api/studies.py, worker worker/study_tasks.py)

Revision ID: 0201_studies
Revises: 0101_admin
Create Date: 2026-11-28
"""
from alembic import op
import sqlalchemy as sa


revision = '0201_studies'
down_revision = '0101_admin'
branch_labels = None
depends_on = None

#: Integer primary/foreign key that autoincrements on SQLite too.
BIGINT_ID = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table('studies',
    sa.Column('seq', BIGINT_ID, autoincrement=True, nullable=False),
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('token_id', BIGINT_ID, nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('queue', sa.String(length=64), nullable=False),
    sa.Column('progress', sa.Float(), nullable=False),
    sa.Column('n_slices', sa.Integer(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('idempotency_key', sa.String(length=200), nullable=True),
    sa.Column('upload_fingerprint', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('dispatched_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('claim_token', sa.String(length=32), nullable=True),
    sa.Column('worker', sa.String(length=200), nullable=True),
    sa.Column('input_key', sa.String(length=200), nullable=False),
    sa.Column('input_sha256', sa.String(length=64), nullable=False),
    sa.Column('input_size', sa.BigInteger(), nullable=False),
    sa.Column('input_format', sa.String(length=16), nullable=False),
    sa.Column('deidentified', sa.Boolean(), nullable=False),
    sa.Column('meta', sa.Text(), nullable=True),
    sa.Column('report', sa.Text(), nullable=True),
    sa.Column('result_checksums', sa.Text(), nullable=True),
    sa.CheckConstraint("status IN ('queued','running','succeeded','failed','cancelled')",
                       name=op.f('ck_studies_status')),
    sa.CheckConstraint('progress >= 0 AND progress <= 100', name=op.f('ck_studies_progress')),
    sa.ForeignKeyConstraint(['token_id'], ['api_tokens.id'], name=op.f('fk_studies_token_id')),
    sa.PrimaryKeyConstraint('seq', name=op.f('pk_studies')),
    sa.UniqueConstraint('id', name=op.f('uq_studies_id')),
    sa.UniqueConstraint('token_id', 'idempotency_key', name='uq_studies_token_idempotency_key')
    )
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.create_index('ix_studies_created_at', ['created_at'], unique=False)
        batch_op.create_index('ix_studies_status_created', ['status', 'created_at'], unique=False)
        batch_op.create_index('ix_studies_status_heartbeat', ['status', 'heartbeat_at'], unique=False)
        batch_op.create_index('ix_studies_token_seq', ['token_id', 'seq'], unique=False)
        batch_op.create_index('ix_studies_token_status_seq', ['token_id', 'status', 'seq'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_index('ix_studies_token_status_seq')
        batch_op.drop_index('ix_studies_token_seq')
        batch_op.drop_index('ix_studies_status_heartbeat')
        batch_op.drop_index('ix_studies_status_created')
        batch_op.drop_index('ix_studies_created_at')
    op.drop_table('studies')
