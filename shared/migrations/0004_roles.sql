-- Least privilege in the database: detfleet_writer for the consumers, detfleet_reader for dashboards and
-- reports. Roles belong to the whole server, grants to one database: a role is created (NOLOGIN) only where
-- it is missing, so an operator may create it first WITH LOGIN PASSWORD, or grant it to login roles of
-- their own. Replicas and test databases migrating side by side may race to create it: that is not an error.
DO $$
DECLARE
    role_name text;
BEGIN
    FOREACH role_name IN ARRAY ARRAY['detfleet_writer', 'detfleet_reader'] LOOP
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = role_name) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', role_name);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;
            END;
        END IF;
    END LOOP;
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO detfleet_writer, detfleet_reader', current_database());
END $$;

GRANT USAGE ON SCHEMA public TO detfleet_writer, detfleet_reader;

-- The writer inserts and upserts rows (ON CONFLICT ... WHERE reads them, hence SELECT) in every detfleet table
-- but the migrations' record, which it may only read; it never deletes, truncates or changes the schema.
DO $$
DECLARE
    table_name text;
BEGIN
    FOR table_name IN
        SELECT tablename FROM pg_tables
        WHERE schemaname = 'public' AND tablename LIKE 'detfleet\_%' AND tablename <> 'detfleet_migrations'
    LOOP
        EXECUTE format('GRANT SELECT, INSERT, UPDATE ON %I TO detfleet_writer', table_name);
    END LOOP;
END $$;
GRANT SELECT ON detfleet_migrations TO detfleet_writer;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO detfleet_reader;

-- Tables later migrations create (they run as the same migrating role) get the same grants by default, so the
-- order in which migrations arrive does not matter.
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE ON TABLES TO detfleet_writer;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO detfleet_reader;
