"""retry history: jobs.retries / jobs.previous_error and the same on studies (shared/service/db.py _retry)

A retry used to reset `attempts` and clear `error`, so the reason the previous run ended was lost. Now `retries`
counts the retries and `previous_error` keeps the last run's error (or "cancelled").

Revision ID: 0301_retry_history
Revises: 0201_studies
Create Date: 2026-11-29
"""
from alembic import op
import sqlalchemy as sa


revision = '0301_retry_history'
down_revision = '0201_studies'
branch_labels = None
depends_on = None

TABLES = ('jobs', 'studies')


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch_op:   # batch mode: SQLite rebuilds the table
            batch_op.add_column(sa.Column('retries', sa.Integer(), nullable=False, server_default='0'))
            batch_op.add_column(sa.Column('previous_error', sa.Text(), nullable=True))


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_column('previous_error')
            batch_op.drop_column('retries')
