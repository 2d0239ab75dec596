"""handbacks: jobs.handbacks / studies.handbacks (shared/service/db.py _release)

A run stopped by a storage or database outage is handed back to the queue and retried by its task. It is still
an attempt (a claim), but not a crash: the crash budget COVIDSEG_JOB_MAX_ATTEMPTS now counts attempts minus
handbacks, so a few seconds of S3 downtime can no longer fail a job as "worker lost".

Revision ID: 0402_handbacks
Revises: 0401_token_scopes_audit
Create Date: 2026-12-03
"""
from alembic import op
import sqlalchemy as sa


revision = '0402_handbacks'
down_revision = '0401_token_scopes_audit'
branch_labels = None
depends_on = None

TABLES = ('jobs', 'studies')


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch_op:   # batch mode: SQLite rebuilds the table
            batch_op.add_column(sa.Column('handbacks', sa.Integer(), nullable=False, server_default='0'))


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_column('handbacks')
