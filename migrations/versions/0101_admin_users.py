"""admin dashboard: admin_users, admin_sessions and the admin_actions audit trail (shared/service/admin_users.py)

Revision ID: 0101_admin
Revises: 0001
Create Date: 2026-11-28
"""
from alembic import op
import sqlalchemy as sa


revision = '0101_admin'
down_revision = '0001'
branch_labels = None
depends_on = None

#: Integer primary/foreign key that autoincrements on SQLite too.
BIGINT_ID = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table('admin_users',
    sa.Column('id', BIGINT_ID, autoincrement=True, nullable=False),
    sa.Column('username', sa.String(length=64), nullable=False),
    sa.Column('password_hash', sa.String(length=255), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('password_changed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_login_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('disabled_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_admin_users')),
    sa.UniqueConstraint('username', name=op.f('uq_admin_users_username'))
    )
    op.create_table('admin_sessions',
    sa.Column('id', BIGINT_ID, autoincrement=True, nullable=False),
    sa.Column('session_hash', sa.String(length=64), nullable=False),
    sa.Column('user_id', BIGINT_ID, nullable=False),
    sa.Column('csrf_token', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_seen_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['admin_users.id'], name=op.f('fk_admin_sessions_user_id'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_admin_sessions')),
    sa.UniqueConstraint('session_hash', name=op.f('uq_admin_sessions_session_hash'))
    )
    with op.batch_alter_table('admin_sessions', schema=None) as batch_op:
        batch_op.create_index('ix_admin_sessions_expires_at', ['expires_at'], unique=False)

    op.create_table('admin_actions',
    sa.Column('id', BIGINT_ID, autoincrement=True, nullable=False),
    sa.Column('job_id', sa.String(length=32), nullable=False),
    sa.Column('username', sa.String(length=64), nullable=False),
    sa.Column('action', sa.String(length=16), nullable=False),
    sa.Column('from_status', sa.String(length=16), nullable=False),
    sa.Column('previous_error', sa.Text(), nullable=True),
    sa.Column('previous_attempts', sa.Integer(), nullable=False),
    sa.Column('previous_worker', sa.String(length=200), nullable=True),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_admin_actions'))
    )
    with op.batch_alter_table('admin_actions', schema=None) as batch_op:
        batch_op.create_index('ix_admin_actions_job_at', ['job_id', 'at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('admin_actions', schema=None) as batch_op:
        batch_op.drop_index('ix_admin_actions_job_at')
    op.drop_table('admin_actions')
    with op.batch_alter_table('admin_sessions', schema=None) as batch_op:
        batch_op.drop_index('ix_admin_sessions_expires_at')
    op.drop_table('admin_sessions')
    op.drop_table('admin_users')
