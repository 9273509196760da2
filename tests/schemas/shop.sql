-- The second schema: a rental shop nobody on the runbook's side designed, with the shapes real schemas have
-- and the demo does not. Stores are the tenants; staff are the users (a plain store_id column, no join table).
--   * payment: range partitioned by month ranges, sub-partitioned by hash, with a DEFAULT partition
--   * store and rental: primary keys without a default (the application supplies the ids)
--   * customer: a unique key over two columns; rental: one over three
--   * rental takes its store from the inventory item; its customer may belong to another store (a conflict
--     between tenants the params settle); payment follows its rental
--   * views, a materialized view, a trigger, a SECURITY DEFINER function owned by a superuser, and a
--     function that writes a temporary table (a smoke query that needs to write)
-- Deterministic: the same rows on every build.

DO $$ BEGIN CREATE ROLE shop_owner NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN CREATE ROLE shop_legacy LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
GRANT CREATE, USAGE ON SCHEMA public TO shop_owner;
GRANT USAGE ON SCHEMA public TO shop_legacy;

SET ROLE shop_owner;

CREATE TABLE store (
    store_id integer PRIMARY KEY,
    name text NOT NULL,
    city text NOT NULL,
    last_update timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE staff (
    staff_id serial PRIMARY KEY,
    store_id integer NOT NULL REFERENCES store,
    email text NOT NULL UNIQUE,
    first_name text NOT NULL,
    last_name text NOT NULL,
    active boolean NOT NULL DEFAULT true
);

CREATE TABLE film (
    film_id serial PRIMARY KEY,
    title text NOT NULL,
    release_year integer NOT NULL,
    rental_rate numeric(4, 2) NOT NULL
);

CREATE TABLE customer (
    customer_id serial PRIMARY KEY,
    store_id integer NOT NULL REFERENCES store,
    email text NOT NULL,
    first_name text NOT NULL,
    last_name text NOT NULL,
    active boolean NOT NULL DEFAULT true,
    last_update timestamptz NOT NULL DEFAULT now(),
    UNIQUE (store_id, email)
);

CREATE TABLE inventory (
    inventory_id serial PRIMARY KEY,
    film_id integer NOT NULL REFERENCES film,
    store_id integer NOT NULL REFERENCES store,
    last_update timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX inventory_store_film_idx ON inventory (store_id, film_id);

CREATE TABLE rental (
    rental_id bigint PRIMARY KEY,
    rental_date timestamptz NOT NULL,
    inventory_id integer NOT NULL REFERENCES inventory,
    customer_id integer NOT NULL REFERENCES customer,
    staff_id integer REFERENCES staff,
    return_date timestamptz,
    UNIQUE (rental_date, inventory_id, customer_id)
);
CREATE INDEX rental_customer_idx ON rental (customer_id);

CREATE TABLE payment (
    payment_id bigserial,
    customer_id integer NOT NULL REFERENCES customer,
    rental_id bigint NOT NULL REFERENCES rental,
    amount numeric(6, 2) NOT NULL CHECK (amount >= 0),
    payment_date timestamptz NOT NULL,
    PRIMARY KEY (payment_id, payment_date)
) PARTITION BY RANGE (payment_date);
CREATE INDEX payment_rental_idx ON payment (rental_id);

DO $$
DECLARE
    q integer;
    lo date;
    hi date;
BEGIN
    FOR q IN 1..4 LOOP
        lo := make_date(2026, 3 * q - 2, 1);
        hi := (lo + interval '3 months')::date;
        EXECUTE format('CREATE TABLE %I PARTITION OF payment FOR VALUES FROM (%L) TO (%L) PARTITION BY HASH (payment_id)',
                       'payment_2026_q' || q, lo, hi);
        EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES WITH (MODULUS 2, REMAINDER 0)',
                       'payment_2026_q' || q || '_h0', 'payment_2026_q' || q);
        EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES WITH (MODULUS 2, REMAINDER 1)',
                       'payment_2026_q' || q || '_h1', 'payment_2026_q' || q);
    END LOOP;
END $$;
CREATE TABLE payment_other PARTITION OF payment DEFAULT;

CREATE FUNCTION touch_last_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.last_update := now();
    RETURN NEW;
END $$;
CREATE TRIGGER customer_last_update BEFORE UPDATE ON customer FOR EACH ROW EXECUTE FUNCTION touch_last_update();

CREATE VIEW customer_list AS
    SELECT c.customer_id, c.first_name || ' ' || c.last_name AS name, c.email, s.name AS store
    FROM customer c JOIN store s USING (store_id);

CREATE VIEW open_rentals AS
    SELECT r.rental_id, r.rental_date, r.customer_id, i.store_id
    FROM rental r JOIN inventory i USING (inventory_id)
    WHERE r.return_date IS NULL;

CREATE MATERIALIZED VIEW sales_by_store AS
    SELECT i.store_id, count(*) AS payments, sum(p.amount) AS total
    FROM payment p JOIN rental r USING (rental_id) JOIN inventory i USING (inventory_id)
    GROUP BY i.store_id;

-- A report the application runs: it stages rows in a temporary table first.
CREATE FUNCTION overdue_report(days integer) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    CREATE TEMPORARY TABLE IF NOT EXISTS overdue_stage (rental_id bigint) ON COMMIT DROP;
    INSERT INTO overdue_stage
        SELECT rental_id FROM rental WHERE return_date IS NULL AND rental_date < now() - make_interval(days => days);
    SELECT count(*) INTO n FROM overdue_stage;
    RETURN n;
END $$;

RESET ROLE;

-- Owned by the superuser that installed it: it reads payments with the owner's rights, whatever RLS says.
CREATE FUNCTION customer_balance(p_customer integer) RETURNS numeric LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = public, pg_temp
    AS $$ SELECT coalesce(sum(amount), 0) FROM payment WHERE customer_id = p_customer $$;

-- The rows: 3 stores, 6 staff, 120 films, 300 customers, 900 inventory items, 3,000 rentals, 4,000 payments.
-- Customers and inventory items are spread over the stores by different strides, so about two thirds of the
-- rentals take an item of one store for a customer of another.
INSERT INTO store (store_id, name, city) VALUES (1, 'Lakeside', 'Lethbridge'), (2, 'Woodridge', 'Woodridge'),
                                                (3, 'Hillcrest', 'Hillcrest');
INSERT INTO staff (store_id, email, first_name, last_name)
    SELECT 1 + (i - 1) % 3, 'staff' || i || '@shop.example', 'Staff' || i, 'Member' FROM generate_series(1, 6) i;
INSERT INTO film (title, release_year, rental_rate)
    SELECT 'Film ' || i, 1990 + i % 30, 0.99 + (i % 4) FROM generate_series(1, 120) i;
INSERT INTO customer (store_id, email, first_name, last_name)
    SELECT 1 + i % 3, 'customer' || i || '@mail.example', 'First' || i, 'Last' || i FROM generate_series(1, 300) i;
-- one email at two stores: the unique key is (store_id, email), not email
INSERT INTO customer (store_id, email, first_name, last_name)
    VALUES (2, 'customer3@mail.example', 'Second', 'Account');
INSERT INTO inventory (film_id, store_id)
    SELECT 1 + i % 120, 1 + (i / 7) % 3 FROM generate_series(1, 900) i;
INSERT INTO rental (rental_id, rental_date, inventory_id, customer_id, staff_id, return_date)
    SELECT 100000 + i, timestamptz '2026-01-01 10:00+00' + make_interval(hours => i * 2),
           1 + (i * 7) % 900, 1 + (i * 13) % 301, 1 + i % 6,
           CASE WHEN i % 10 = 0 THEN NULL ELSE timestamptz '2026-01-03 10:00+00' + make_interval(hours => i * 2) END
    FROM generate_series(1, 3000) i;
INSERT INTO payment (customer_id, rental_id, amount, payment_date)
    SELECT r.customer_id, r.rental_id, 1 + (r.rental_id % 5), r.rental_date + make_interval(days => (r.rental_id % 120)::int)
    FROM rental r CROSS JOIN generate_series(1, 2) k
    WHERE k = 1 OR r.rental_id % 3 = 0;

REFRESH MATERIALIZED VIEW sales_by_store;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO shop_legacy;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO shop_legacy;
ANALYZE;
