"""tasks.finish_reason: why an answer ended ("stop", or "length" when max_tokens cut it)

The task page says an answer was cut off instead of showing a silent 100 %.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07

"""
import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('finish_reason', sa.String(length=32), nullable=True))


def downgrade():
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_column('finish_reason')
