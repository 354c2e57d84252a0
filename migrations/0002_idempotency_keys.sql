-- Responses stored under a client's Idempotency-Key, replayed on retry until they expire.
-- Written in the same transaction as the effect they describe, so a stored response always
-- corresponds to a committed effect and vice versa.

create table idempotency_keys (
    scope            text        not null,
    key              text        not null,
    -- The request as parsed, compared as jsonb (key order and whitespace do not matter).
    request          jsonb       not null,
    response_status  smallint    not null,
    response_body    jsonb       not null,
    created_at       timestamptz not null default now(),
    expires_at       timestamptz not null,
    constraint idempotency_keys_pkey primary key (scope, key),
    constraint idempotency_key_length check (char_length(key) between 1 and 255)
);

create index idempotency_keys_expires_at_idx on idempotency_keys (expires_at);
