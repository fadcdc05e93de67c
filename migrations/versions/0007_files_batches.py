"""files and batches: OpenAI's Files and Batch APIs; a batch line's task knows its batch

Files keep their content in file_chunks (bytea, at most 4 MiB a row). A batch's output and
error files are made from its tasks when read. Tasks gain batch_id, custom_id and batch_line.

Revision ID: 0007
Revises: 0005
Create Date: 2026-12-07

"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision = '0007'
down_revision = '0005'
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')
JsonDoc = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')
Time = sa.DateTime(timezone=True)


def upgrade():
    op.create_table(
        'batches',
        sa.Column('id', sa.String(length=40), nullable=False),
        sa.Column('user_id', BigId, nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('endpoint', sa.String(length=64), nullable=False),
        sa.Column('completion_window', sa.String(length=8), nullable=False),
        sa.Column('input_file_id', sa.String(length=40), nullable=False),
        sa.Column('output_file_id', sa.String(length=40), nullable=True),
        sa.Column('error_file_id', sa.String(length=40), nullable=True),
        sa.Column('input_format', sa.String(length=8), nullable=False),
        sa.Column('model', sa.String(length=100), nullable=True),
        sa.Column('priority', sa.SmallInteger(), nullable=False),
        sa.Column('metadata', JsonDoc, nullable=True),
        sa.Column('errors', JsonDoc, nullable=True),
        sa.Column('total', sa.Integer(), nullable=False),
        sa.Column('completed', sa.Integer(), nullable=False),
        sa.Column('failed', sa.Integer(), nullable=False),
        sa.Column('created_at', Time, nullable=False),
        sa.Column('in_progress_at', Time, nullable=True),
        sa.Column('expires_at', Time, nullable=False),
        sa.Column('finalizing_at', Time, nullable=True),
        sa.Column('completed_at', Time, nullable=True),
        sa.Column('failed_at', Time, nullable=True),
        sa.Column('expired_at', Time, nullable=True),
        sa.Column('cancelling_at', Time, nullable=True),
        sa.Column('cancelled_at', Time, nullable=True),
        sa.Column('updated_at', Time, nullable=False),
        sa.CheckConstraint(
            "status IN ('validating', 'failed', 'in_progress', 'finalizing', 'completed', 'expired',"
            " 'cancelling', 'cancelled')",
            name=op.f('ck_batches_status'),
        ),
        sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_batches_user_id_users'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_batches')),
    )
    with op.batch_alter_table('batches', schema=None) as batch_op:
        batch_op.create_index('ix_batches_user_id_created_at', ['user_id', 'created_at'], unique=False)
        batch_op.create_index('ix_batches_status', ['status'], unique=False)

    op.create_table(
        'files',
        sa.Column('id', sa.String(length=40), nullable=False),
        sa.Column('user_id', BigId, nullable=False),
        sa.Column('purpose', sa.String(length=32), nullable=False),
        sa.Column('filename', sa.String(length=255), nullable=False),
        sa.Column('bytes', sa.BigInteger(), nullable=False),
        sa.Column('lines', sa.Integer(), nullable=False),
        sa.Column('kind', sa.String(length=8), nullable=False),
        sa.Column('batch_id', sa.String(length=40), nullable=True),
        sa.Column('created_at', Time, nullable=False),
        sa.CheckConstraint("kind IN ('upload', 'output', 'error')", name=op.f('ck_files_kind')),
        sa.ForeignKeyConstraint(
            ['batch_id'], ['batches.id'], name=op.f('fk_files_batch_id_batches'), ondelete='CASCADE'
        ),
        sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_files_user_id_users'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_files')),
    )
    with op.batch_alter_table('files', schema=None) as batch_op:
        batch_op.create_index('ix_files_user_id_created_at', ['user_id', 'created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_files_batch_id'), ['batch_id'], unique=False)

    op.create_table(
        'file_chunks',
        sa.Column('file_id', sa.String(length=40), nullable=False),
        sa.Column('seq', sa.Integer(), nullable=False),
        sa.Column('data', sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ['file_id'], ['files.id'], name=op.f('fk_file_chunks_file_id_files'), ondelete='CASCADE'
        ),
        sa.PrimaryKeyConstraint('file_id', 'seq', name=op.f('pk_file_chunks')),
    )

    op.create_table(
        'batch_line_errors',
        sa.Column('id', BigId, nullable=False),
        sa.Column('batch_id', sa.String(length=40), nullable=False),
        sa.Column('line', sa.Integer(), nullable=False),
        sa.Column('custom_id', sa.String(length=512), nullable=False),
        sa.Column('code', sa.String(length=64), nullable=False),
        sa.Column('message', sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ['batch_id'], ['batches.id'], name=op.f('fk_batch_line_errors_batch_id_batches'), ondelete='CASCADE'
        ),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_batch_line_errors')),
    )
    with op.batch_alter_table('batch_line_errors', schema=None) as batch_op:
        batch_op.create_index('ix_batch_line_errors_batch_id_line', ['batch_id', 'line'], unique=False)

    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('batch_id', sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column('custom_id', sa.String(length=512), nullable=True))
        batch_op.add_column(sa.Column('batch_line', sa.Integer(), nullable=True))
        batch_op.create_foreign_key(
            batch_op.f('fk_tasks_batch_id_batches'), 'batches', ['batch_id'], ['id'], ondelete='CASCADE'
        )
        batch_op.create_index(
            'ix_tasks_batch_id_status_id',
            ['batch_id', 'status', 'id'],
            unique=False,
            postgresql_where=sa.text('batch_id IS NOT NULL'),
            sqlite_where=sa.text('batch_id IS NOT NULL'),
        )


def downgrade():
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_index('ix_tasks_batch_id_status_id')
        batch_op.drop_constraint(batch_op.f('fk_tasks_batch_id_batches'), type_='foreignkey')
        batch_op.drop_column('batch_line')
        batch_op.drop_column('custom_id')
        batch_op.drop_column('batch_id')
    op.drop_table('batch_line_errors')
    op.drop_table('file_chunks')
    op.drop_table('files')
    op.drop_table('batches')
