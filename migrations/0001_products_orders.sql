-- Products and orders: the flash-sale core.
--
-- Invariant, at every instant: initial_stock + restocked = stock + sold, and stock >= 0.
-- `sold` is kept in the same row as `stock` so the single ordering statement maintains it, and
-- the invariant is checkable per product without scanning orders (orders sum to `sold` too).

create table products (
    id             bigint generated always as identity primary key,
    name           text        not null,
    price_cents    bigint      not null,
    initial_stock  bigint      not null,
    stock          bigint      not null,
    sold           bigint      not null default 0,
    restocked      bigint      not null default 0,
    created_at     timestamptz not null default now(),
    updated_at     timestamptz not null default now(),
    constraint stock_not_negative check (stock >= 0),
    constraint price_not_negative check (price_cents >= 0),
    constraint product_name_length check (char_length(name) between 1 and 200),
    constraint stock_balances check (initial_stock + restocked = stock + sold)
);

create table orders (
    id                bigint generated always as identity primary key,
    product_id        bigint      not null references products (id),
    buyer_id          text        not null,
    quantity          integer     not null,
    unit_price_cents  bigint      not null,
    total_cents       bigint      not null,
    created_at        timestamptz not null default now(),
    constraint quantity_positive check (quantity > 0),
    constraint buyer_id_length check (char_length(buyer_id) between 1 and 255),
    constraint total_matches check (total_cents = unit_price_cents * quantity)
);

create index orders_product_id_idx on orders (product_id, id);
create index orders_buyer_id_idx on orders (buyer_id, id);
