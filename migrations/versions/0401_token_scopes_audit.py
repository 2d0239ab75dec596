"""least privilege: api_tokens.scopes / api_tokens.expires_at, and the audit_events table

A token carries scopes ("read submit" for what existed before; "admin" is granted only explicitly) and may
expire. audit_events records who did what: admin actions (logins, cancel, retry) and token management.

Revision ID: 0401_token_scopes_audit
Revises: 0301_retry_history
Create Date: 2026-12-03
"""
from alembic import op
import sqlalchemy as sa


revision = '0401_token_scopes_audit'
down_revision = '0301_retry_history'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('api_tokens') as batch_op:   # batch mode: SQLite rebuilds the table
        batch_op.add_column(sa.Column('scopes', sa.String(length=64), nullable=False, server_default='read submit'))
        batch_op.add_column(sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        'audit_events',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('actor', sa.String(length=140), nullable=False),
        sa.Column('action', sa.String(length=64), nullable=False),
        sa.Column('target', sa.String(length=140), nullable=True),
        sa.Column('client', sa.String(length=64), nullable=True),
        sa.Column('detail', sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_events')),
    )
    op.create_index('ix_audit_events_at', 'audit_events', ['at'])


def downgrade() -> None:
    op.drop_index('ix_audit_events_at', table_name='audit_events')
    op.drop_table('audit_events')
    with op.batch_alter_table('api_tokens') as batch_op:
        batch_op.drop_column('expires_at')
        batch_op.drop_column('scopes')
