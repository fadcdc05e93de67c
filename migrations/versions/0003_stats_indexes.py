"""stats and retention index: tasks (status, finished_at)

Counts by status, the per-minute and per-hour charts and the retention cleanup all read
finished tasks of one status in a range of finish times; this index answers them without
touching the table (index-only scans on PostgreSQL).

Revision ID: 0003
Revises: 0001
Create Date: 2026-11-28

"""
from alembic import op

# revision identifiers, used by Alembic.
revision = '0003'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.create_index('ix_tasks_status_finished_at', ['status', 'finished_at'], unique=False)


def downgrade():
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_index('ix_tasks_status_finished_at')
