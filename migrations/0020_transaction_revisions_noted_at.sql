-- When each revision was noted, so revisions no job can still need are pruned
-- (`finalize::prune_revisions`): a job reads its mark, the largest revision id, before its run's
-- row exists, so only a revision older than `settlement.revision_retention_hours` and at or
-- below every live run's mark is let go. Rows from before this migration take its time.
alter table transaction_revisions add column noted_at timestamptz not null default now();
