"""costs, budgets and usage: task cost, reservation, served_by, active model, failed attempts; user budgets; usage ledgers

Money is NUMERIC: costs, reservations and spend with 12 decimal places (a token at a price
with 6 decimals per million), prices and budgets with 6.

Revision ID: 0009
Revises: 0003
Create Date: 2026-12-06

"""
from alembic import op
import sqlalchemy as sa

# revision identifiers, used by Alembic.
revision = '0009'
down_revision = '0003'
branch_labels = None
depends_on = None

BIGID = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')
AMOUNT = sa.Numeric(24, 12)
PRICE = sa.Numeric(18, 6)


def upgrade():
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.add_column(sa.Column('budget_is_default', sa.Boolean(), server_default=sa.text('true'), nullable=False))
        batch_op.add_column(sa.Column('monthly_budget_usd', PRICE, nullable=True))

    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('served_by', sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column('usd_per_million_input_tokens', PRICE, nullable=True))
        batch_op.add_column(sa.Column('usd_per_million_output_tokens', PRICE, nullable=True))
        batch_op.add_column(sa.Column('cost_usd', AMOUNT, nullable=True))
        batch_op.add_column(sa.Column('reserved_usd', AMOUNT, nullable=True))
        batch_op.add_column(sa.Column('reserved_month', sa.Date(), nullable=True))
        batch_op.add_column(sa.Column('active_model', sa.String(length=100), nullable=True))

    op.create_table('task_attempts',
    sa.Column('id', BIGID, nullable=False),
    sa.Column('task_id', BIGID, nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('model', sa.String(length=100), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('detail', sa.String(length=200), nullable=False),
    sa.Column('fell_back', sa.Boolean(), server_default=sa.text('false'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], name=op.f('fk_task_attempts_task_id_tasks'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_task_attempts'))
    )
    with op.batch_alter_table('task_attempts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_task_attempts_task_id'), ['task_id'], unique=False)

    op.create_table('usage_months',
    sa.Column('user_id', BIGID, nullable=False),
    sa.Column('month', sa.Date(), nullable=False),
    sa.Column('spent_usd', AMOUNT, server_default=sa.text('0'), nullable=False),
    sa.Column('reserved_usd', AMOUNT, server_default=sa.text('0'), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_usage_months_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('user_id', 'month', name=op.f('pk_usage_months'))
    )
    with op.batch_alter_table('usage_months', schema=None) as batch_op:
        batch_op.create_index('ix_usage_months_month', ['month'], unique=False)

    op.create_table('usage_days',
    sa.Column('user_id', BIGID, nullable=False),
    sa.Column('day', sa.Date(), nullable=False),
    sa.Column('model', sa.String(length=100), nullable=False),
    sa.Column('tasks', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('prompt_tokens', sa.BigInteger(), server_default=sa.text('0'), nullable=False),
    sa.Column('completion_tokens', sa.BigInteger(), server_default=sa.text('0'), nullable=False),
    sa.Column('cost_usd', AMOUNT, server_default=sa.text('0'), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_usage_days_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('user_id', 'day', 'model', name=op.f('pk_usage_days'))
    )


def downgrade():
    op.drop_table('usage_days')
    op.drop_table('task_attempts')
    with op.batch_alter_table('usage_months', schema=None) as batch_op:
        batch_op.drop_index('ix_usage_months_month')
    op.drop_table('usage_months')
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        for column in ('active_model', 'reserved_month', 'reserved_usd', 'cost_usd', 'usd_per_million_output_tokens',
                       'usd_per_million_input_tokens', 'served_by'):
            batch_op.drop_column(column)
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_column('monthly_budget_usd')
        batch_op.drop_column('budget_is_default')
