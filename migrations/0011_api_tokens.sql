-- API tokens: who may call /api/v1 and with which role (`settle tokens create|list|revoke`).
--
-- Only the SHA-256 of a token's secret is stored: a token is 32 random bytes, so a plain hash
-- (no salt, no slow KDF) cannot be reversed, and a copy of this table authenticates nobody.
-- Revoking keeps the row (revoked_at is set), so `tokens list` shows who had access until when.

create table api_tokens (
    id           bigint generated always as identity primary key,
    -- The operator's label ("checkout-service"); optional.
    name         text,
    role         text        not null,
    -- The one merchant whose settlements a `merchant` token may read; null for other roles.
    merchant_id  text,
    secret_hash  bytea       not null,
    created_at   timestamptz not null default now(),
    revoked_at   timestamptz,
    constraint api_tokens_secret_hash_key unique (secret_hash),
    constraint api_token_role_known check (role in ('admin', 'shop', 'ingest', 'merchant')),
    constraint api_token_merchant_iff_merchant_role
        check ((role = 'merchant') = (merchant_id is not null)),
    constraint api_token_secret_hash_length check (octet_length(secret_hash) = 32),
    constraint api_token_name_length check (char_length(name) between 1 and 200),
    constraint api_token_merchant_id_length check (char_length(merchant_id) between 1 and 255)
);
