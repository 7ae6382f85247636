-- ---------------------------------------------------------------------------
-- watch: postbacks from a table the application already has (orders, sales).
-- postback.watch(source, mapping) puts triggers on the table: its INSERTs
-- become conversions (and their deliveries) in the same transaction, UPDATEs
-- of mapped fields become lifecycle postbacks, a DELETE becomes a status when
-- the mapping says which. The mapping's expressions run with the rights of
-- the table's owner (a SECURITY DEFINER function owned by that owner, created
-- in the table's schema): nothing in them runs as anyone else, and the people
-- who insert into the table need no grant on postback.
-- ---------------------------------------------------------------------------

-- The conversion fields a mapping may name, with the type each is written as.
CREATE FUNCTION postback.watch_fields(OUT field text, OUT type regtype, OUT required boolean)
RETURNS SETOF record
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    VALUES ('click_id', 'text'::regtype, true), ('transaction_id', 'text', true), ('event', 'text', false),
           ('status', 'text', false), ('amount', 'numeric', false), ('currency', 'text', false),
           ('occurred_at', 'timestamptz', false), ('partner', 'text', false), ('attributes', 'jsonb', false)
$$;

-- The SQL a mapping value stands for over the row alias r: a column of the
-- source (r."column") or, otherwise, an SQL expression over its columns.
CREATE FUNCTION postback.watch_expression(source regclass, value text) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                              WHERE a.attrelid = source AND a.attname = value AND a.attnum > 0 AND NOT a.attisdropped)
                THEN 'r.' || pg_catalog.quote_ident(value)
                ELSE '(' || value || ')' END
$$;

-- Checks one mapping value against the source: it must be a column or an SQL
-- expression over the row whose type can be written into the field (any type
-- into a text field, as an INSERT would). Raises naming the field; returns the
-- SQL for it. Runs as the caller (the table's owner): the expression is only
-- planned (a cursor, which takes a single statement, then a temporary view
-- for its type), never run.
CREATE FUNCTION postback.watch_check(source regclass, field text, value jsonb, target regtype) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    expression text;
    got regtype;
    base regtype;
    state text;
    message text;
    probe refcursor;
BEGIN
    IF pg_catalog.jsonb_typeof(value) IS DISTINCT FROM 'string' OR btrim(value #>> '{}') = '' THEN
        RAISE EXCEPTION 'mapping field "%" must be a column name or an SQL expression over the row, as a JSON string', field
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = pg_catalog.format('It is %s.', coalesce(value::text, 'missing')),
                  HINT = pg_catalog.format('For example {"%s": "%s"} names a column of %s.', field, field, source);
    END IF;
    expression := postback.watch_expression(source, value #>> '{}');
    BEGIN
        -- a cursor takes one statement only, and is planned without running it
        -- ("1) FROM t; DELETE …" is refused here, before anything runs)
        OPEN probe FOR EXECUTE pg_catalog.format('SELECT %s AS v FROM %s AS r WHERE false', expression, source);
        CLOSE probe;
        EXECUTE pg_catalog.format('CREATE TEMPORARY VIEW postback_watch_check AS SELECT %s AS v FROM %s AS r',
                                  expression, source);
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE, message = MESSAGE_TEXT;
        RAISE EXCEPTION 'mapping field "%" (%): %', field, value #>> '{}', message
            USING ERRCODE = state,
                  HINT = pg_catalog.format('Name a column of %s or write an SQL expression over its columns; columns: %s.',
                                           source, (SELECT string_agg(a.attname, ', ' ORDER BY a.attnum)
                                                      FROM pg_catalog.pg_attribute a
                                                     WHERE a.attrelid = source AND a.attnum > 0 AND NOT a.attisdropped));
    END;
    SELECT a.atttypid INTO got FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = 'pg_temp.postback_watch_check'::regclass AND a.attname = 'v';
    DROP VIEW pg_temp.postback_watch_check;
    base := coalesce((SELECT t.typbasetype FROM pg_catalog.pg_type t WHERE t.oid = got AND t.typtype = 'd'), got);
    IF base <> target AND target <> 'text'::regtype
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_cast c
                        WHERE c.castsource = base AND c.casttarget = target AND c.castcontext IN ('a', 'i')) THEN
        RAISE EXCEPTION 'mapping field "%" (%) is of type %, which cannot be written as %', field, value #>> '{}', got, target
            USING ERRCODE = 'datatype_mismatch',
                  HINT = CASE WHEN field = 'when' THEN 'The "when" expression must be boolean: rows for which it is true become conversions.'
                              ELSE pg_catalog.format('Convert it in the expression, for example "(%s)::%s".', value #>> '{}', target) END;
    END IF;
    RETURN expression;
END
$$;

-- Drops a watch's triggers from the table and its partitions (those a
-- partitioned table's row trigger put on its partitions go with it).
CREATE FUNCTION postback.watch_drop_triggers(source regclass) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT g.tgname, g.tgrelid::regclass AS rel
               FROM (SELECT source AS relid UNION ALL
                     SELECT p.relid FROM pg_catalog.pg_partition_tree(source) p WHERE p.relid <> source) m
               JOIN pg_catalog.pg_trigger g ON g.tgrelid = m.relid
              WHERE g.tgname IN ('postback_watch_insert', 'postback_watch_update', 'postback_watch_delete')
                AND g.tgparentid = 0 LOOP
        EXECUTE pg_catalog.format('DROP TRIGGER %I ON %s', t.tgname, t.rel);
    END LOOP;
END
$$;

CREATE FUNCTION postback.watch(source regclass, mapping jsonb) RETURNS regprocedure
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    rel record;
    owner_name name;
    f record;
    columns text[] := '{}';
    exprs text[] := '{}';
    changed text[] := '{}';
    direct text[] := '{}';
    excluded text[] := '{}';
    x text;
    where_sql text := 'true';
    on_delete text;
    attributes_sql text;
    function_name text;
    qualified text;
    existing regprocedure;
    body text;
    cols text;
    c_cols text;
    n_cols text;
    tx text;
    keys text[];
    key_names text;
    update_sql text;
    delete_sql text;
    member regclass;
    probe refcursor;
    state text;
    message text;
BEGIN
    IF source IS NULL OR mapping IS NULL THEN
        RAISE EXCEPTION 'source and mapping must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT c.relname, c.relnamespace, n.nspname, c.relkind, c.relowner INTO rel
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = source;
    IF rel.relkind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION '% is not a table', source
            USING ERRCODE = 'wrong_object_type', HINT = 'Only a table (plain or partitioned) can be watched.';
    END IF;
    IF rel.nspname IN ('postback', 'pg_catalog', 'information_schema') OR rel.nspname LIKE 'pg\_%' THEN
        RAISE EXCEPTION 'a table in schema % cannot be watched', rel.nspname
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Watch the application''s own table; rows written into postback.conversions are delivered already.';
    END IF;
    owner_name := pg_catalog.pg_get_userbyid(rel.relowner);
    IF NOT pg_catalog.pg_has_role(current_user, rel.relowner, 'USAGE') THEN
        RAISE EXCEPTION 'must be the owner of table % to watch it', source
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = pg_catalog.format('%s is owned by %s.', source, owner_name),
                  HINT = 'The mapping''s expressions run with the rights of the table''s owner, so only that owner (or a superuser) may write them.';
    END IF;
    IF pg_catalog.jsonb_typeof(mapping) <> 'object' THEN
        RAISE EXCEPTION 'mapping must be a JSON object, not %', pg_catalog.jsonb_typeof(mapping)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'For example {"click_id": "click_id", "transaction_id": "order_id::text", "amount": "total"}.';
    END IF;
    SELECT k INTO x FROM pg_catalog.jsonb_object_keys(mapping) k
     WHERE k NOT IN (SELECT w.field FROM postback.watch_fields() w) AND k NOT IN ('when', 'exclude', 'on_delete')
     LIMIT 1;
    IF x IS NOT NULL THEN
        RAISE EXCEPTION 'unknown mapping key "%"', x
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'Valid keys: ' || (SELECT string_agg(w.field, ', ') FROM postback.watch_fields() w)
                           || ', when, exclude, on_delete.';
    END IF;
    SELECT array_agg(a.attname::text ORDER BY a.attnum) INTO columns FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = source AND a.attnum > 0 AND NOT a.attisdropped;

    FOR f IN SELECT * FROM postback.watch_fields() LOOP
        IF NOT mapping ? f.field THEN
            IF f.required THEN
                RAISE EXCEPTION 'the mapping has no "%"', f.field
                    USING ERRCODE = 'invalid_parameter_value',
                          HINT = CASE f.field
                              WHEN 'transaction_id' THEN 'Name the column (or an SQL expression) that identifies the conversion, such as the order id: it is unique in postback.conversions and an UPDATE of the row finds its conversion by it.'
                              ELSE 'Name the column (or an SQL expression) holding the click id the network passed.' END;
            END IF;
            CONTINUE;
        END IF;
        x := postback.watch_check(source, f.field, mapping -> f.field, f.type);
        IF (mapping ->> f.field) = ANY (columns) THEN
            direct := direct || (mapping ->> f.field);
        END IF;
        changed := changed || f.field;
        exprs := exprs || pg_catalog.format('(%s)::%s', x, f.type);
    END LOOP;

    IF mapping ? 'exclude' THEN
        IF pg_catalog.jsonb_typeof(mapping -> 'exclude') <> 'array'
           OR EXISTS (SELECT 1 FROM pg_catalog.jsonb_array_elements(mapping -> 'exclude') e WHERE pg_catalog.jsonb_typeof(e) <> 'string') THEN
            RAISE EXCEPTION 'mapping "exclude" must be a JSON array of column names'
                USING ERRCODE = 'invalid_parameter_value', HINT = 'For example {"exclude": ["card_number", "email"]}.';
        END IF;
        SELECT e INTO x FROM pg_catalog.jsonb_array_elements_text(mapping -> 'exclude') e WHERE e <> ALL (columns) LIMIT 1;
        IF x IS NOT NULL THEN
            RAISE EXCEPTION 'mapping "exclude" names "%", which is not a column of %', x, source
                USING ERRCODE = 'undefined_column', HINT = 'Columns: ' || array_to_string(columns, ', ') || '.';
        END IF;
        excluded := ARRAY(SELECT pg_catalog.jsonb_array_elements_text(mapping -> 'exclude'));
    END IF;
    IF mapping ? 'when' THEN
        where_sql := postback.watch_check(source, 'when', mapping -> 'when', 'boolean');
    END IF;
    IF mapping ? 'on_delete' THEN
        on_delete := mapping ->> 'on_delete';
        IF pg_catalog.jsonb_typeof(mapping -> 'on_delete') <> 'string'
           OR on_delete NOT IN ('pending', 'approved', 'rejected', 'reversed', 'refunded', 'chargeback') THEN
            RAISE EXCEPTION 'mapping "on_delete" must be the status a deleted row announces, not %', mapping -> 'on_delete'
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = 'Valid values: pending, approved, rejected, reversed, refunded, chargeback.',
                      HINT = 'Leave it out and a DELETE announces nothing.';
        END IF;
    END IF;
    IF NOT mapping ? 'attributes' THEN
        -- every column not mapped by name nor excluded, by name
        attributes_sql := 'pg_catalog.to_jsonb(r.*)';
        IF cardinality(direct || excluded) > 0 THEN
            attributes_sql := attributes_sql || pg_catalog.format(' - %L::text[]', direct || excluded);
        END IF;
        changed := changed || 'attributes'::text;
        exprs := exprs || attributes_sql;
    END IF;

    IF NOT pg_catalog.has_schema_privilege(current_user, rel.relnamespace, 'CREATE') THEN
        RAISE EXCEPTION 'watch creates the trigger function of % in schema %, where % may not create', source, rel.nspname, current_user
            USING ERRCODE = 'insufficient_privilege',
                  HINT = pg_catalog.format('GRANT CREATE ON SCHEMA %I TO %I; or let a superuser watch the table.', rel.nspname, current_user);
    END IF;
    -- the owner writes the conversions: it needs what an operator has
    IF NOT pg_catalog.has_schema_privilege(rel.relowner, 'postback', 'USAGE')
       OR NOT pg_catalog.has_table_privilege(rel.relowner, 'postback.conversions', 'INSERT, UPDATE') THEN
        RAISE EXCEPTION 'the owner of %, %, cannot write postback.conversions', source, owner_name
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'The watch''s trigger writes the conversions with the rights of the table''s owner.',
                  HINT = pg_catalog.format('A superuser runs SELECT postback.grant_operator(%L); then watch again.', owner_name);
    END IF;

    -- the fields together: one statement (an aggregate in one field and a
    -- column in another is refused here, not on the table's next insert)
    BEGIN
        OPEN probe FOR EXECUTE pg_catalog.format('SELECT %s FROM %s AS r WHERE (%s) AND false',
                                                 array_to_string(exprs, ', '), source, where_sql);
        CLOSE probe;
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE, message = MESSAGE_TEXT;
        RAISE EXCEPTION 'the mapping''s fields do not make one row per row of %: %', source, message
            USING ERRCODE = state,
                  HINT = 'Each field is a value of one row: no aggregates (sum, count), window or set-returning functions.';
    END;

    -- <table>_postback_watch, the table's name cut to fit 63 bytes
    function_name := rel.relname;
    WHILE octet_length(function_name) > 48 LOOP
        function_name := left(function_name, -1);
    END LOOP;
    function_name := function_name || '_postback_watch';
    qualified := pg_catalog.format('%I.%I', rel.nspname, function_name);
    existing := pg_catalog.to_regprocedure(qualified || '()');
    IF existing IS NOT NULL AND existing IS DISTINCT FROM (
           SELECT t.tgfoid FROM pg_catalog.pg_trigger t WHERE t.tgrelid = source AND t.tgname = 'postback_watch_insert') THEN
        RAISE EXCEPTION 'function %() exists and is not this table''s watch', qualified
            USING ERRCODE = 'duplicate_function', HINT = 'Rename or drop it; watch creates its trigger function under that name.';
    END IF;

    cols := (SELECT string_agg(pg_catalog.quote_ident(c), ', ') FROM unnest(changed) c);
    c_cols := (SELECT string_agg('c.' || pg_catalog.quote_ident(c), ', ') FROM unnest(changed) c);
    n_cols := (SELECT string_agg('n.' || pg_catalog.quote_ident(c), ', ') FROM unnest(changed) c);
    tx := postback.watch_expression(source, mapping ->> 'transaction_id');
    SELECT array_agg(pg_catalog.quote_ident(a.attname) ORDER BY k.n) INTO keys
      FROM pg_catalog.pg_index i
     CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k (attnum, n)
      JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = source AND i.indisprimary;
    IF keys IS NOT NULL THEN
        -- one statement for all the rows an UPDATE changed, old and new paired by
        -- the primary key: the conversions' triggers run once, as for an UPDATE
        -- of postback.conversions
        key_names := (SELECT string_agg('postback_key_' || n, ', ') FROM generate_series(1, cardinality(keys)) n);
        update_sql := pg_catalog.format($u$
    ELSIF TG_OP = 'UPDATE' THEN
        UPDATE postback.conversions AS c SET (%1$s) = (%2$s)
          FROM (SELECT %3$s, (%4$s)::text FROM postback_old_rows AS r) AS o (%5$s, postback_old_transaction_id)
          JOIN (SELECT %3$s, %6$s FROM postback_new_rows AS r) AS n (%5$s, %1$s) USING (%5$s)
         WHERE c.transaction_id = o.postback_old_transaction_id AND (%7$s) IS DISTINCT FROM (%2$s);
        -- rows that were no conversion yet (written before the watch, or left out by "when")
        INSERT INTO postback.conversions (%1$s)
        SELECT %6$s FROM postback_new_rows AS r
         WHERE %8$s AND NOT EXISTS (SELECT 1 FROM postback.conversions AS c WHERE c.transaction_id = (%4$s)::text)
            ON CONFLICT (transaction_id) DO NOTHING;
$u$, cols, n_cols, (SELECT string_agg('r.' || k, ', ') FROM unnest(keys) k), tx, key_names,
            array_to_string(exprs, ', '), c_cols, where_sql);
    ELSE
        -- no primary key to pair old and new rows by: row by row
        update_sql := pg_catalog.format($u$
    ELSIF TG_OP = 'UPDATE' THEN
        SELECT (%4$s)::text INTO postback_old_transaction_id FROM (SELECT OLD.*) AS r;
        UPDATE postback.conversions AS c SET (%1$s) = (%2$s)
          FROM (SELECT %6$s FROM (SELECT NEW.*) AS r) AS n (%1$s)
         WHERE c.transaction_id = postback_old_transaction_id AND (%7$s) IS DISTINCT FROM (%2$s);
        IF NOT FOUND AND NOT EXISTS (SELECT 1 FROM postback.conversions AS c
                                      WHERE c.transaction_id = postback_old_transaction_id) THEN
            -- a row that was no conversion yet (written before the watch, or left out by "when")
            INSERT INTO postback.conversions (%1$s)
            SELECT %6$s FROM (SELECT NEW.*) AS r WHERE %8$s
                ON CONFLICT (transaction_id) DO NOTHING;
        END IF;
$u$, cols, n_cols, NULL, tx, NULL, array_to_string(exprs, ', '), c_cols, where_sql);
    END IF;
    IF on_delete IS NOT NULL THEN
        delete_sql := pg_catalog.format($d$
    ELSIF TG_OP = 'DELETE' THEN
        UPDATE postback.conversions AS c SET status = %1$L
         WHERE c.transaction_id = ANY (ARRAY(SELECT (%2$s)::text FROM postback_old_rows AS r)) AND c.status <> %1$L;
$d$, on_delete, tx);
    END IF;

    body := pg_catalog.format($b$#variable_conflict use_column
-- written by postback.watch: the mapping is this function's trigger
-- argument (postback.watches shows it); postback.unwatch removes it.
DECLARE
    postback_old_transaction_id text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO postback.conversions (%1$s)
        SELECT %2$s FROM postback_new_rows AS r WHERE %3$s
            ON CONFLICT (transaction_id) DO NOTHING;%4$s%5$s
    END IF;
    RETURN NULL;
END
$b$, cols, array_to_string(exprs, ', '), where_sql, update_sql, coalesce(delete_sql, ''));

    -- watching again replaces the mapping
    PERFORM postback.watch_drop_triggers(source);
    EXECUTE pg_catalog.format(
        'CREATE OR REPLACE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER '
        'SET search_path = pg_catalog, %I, pg_temp AS %L', qualified, rel.nspname, body);
    EXECUTE pg_catalog.format('REVOKE EXECUTE ON FUNCTION %s() FROM PUBLIC', qualified);
    IF current_user <> owner_name THEN
        EXECUTE pg_catalog.format('ALTER FUNCTION %s() OWNER TO %I', qualified, owner_name);
    END IF;
    EXECUTE pg_catalog.format('COMMENT ON FUNCTION %s() IS %L', qualified,
        pg_catalog.format('pg_postback watch of %s: turns its rows into conversions with the rights of its owner '
                          '(postback.watches shows the mapping; postback.unwatch(%L) removes it).', source, source));
    EXECUTE pg_catalog.format('ALTER FUNCTION %s() DEPENDS ON EXTENSION pg_postback', qualified);
    -- on the table and on each of its partitions (a statement trigger fires on
    -- the table a statement names: an INSERT straight into a partition fires
    -- the partition's, one through the table only the table's); only the
    -- table's carries the mapping
    FOR member IN SELECT source UNION ALL
                  SELECT p.relid FROM pg_catalog.pg_partition_tree(source) p WHERE p.relid <> source LOOP
        EXECUTE pg_catalog.format(
            'CREATE TRIGGER postback_watch_insert AFTER INSERT ON %s REFERENCING NEW TABLE AS postback_new_rows '
            'FOR EACH STATEMENT EXECUTE FUNCTION %s(%s)', member, qualified,
            CASE WHEN member = source THEN pg_catalog.quote_literal(mapping::text) ELSE '' END);
        IF keys IS NOT NULL THEN
            EXECUTE pg_catalog.format(
                'CREATE TRIGGER postback_watch_update AFTER UPDATE ON %s REFERENCING OLD TABLE AS postback_old_rows '
                'NEW TABLE AS postback_new_rows FOR EACH STATEMENT EXECUTE FUNCTION %s()', member, qualified);
        ELSIF member = source THEN
            -- a row trigger on a partitioned table is on its partitions too
            EXECUTE pg_catalog.format(
                'CREATE TRIGGER postback_watch_update AFTER UPDATE ON %s FOR EACH ROW EXECUTE FUNCTION %s()',
                source, qualified);
        END IF;
        IF on_delete IS NOT NULL THEN
            EXECUTE pg_catalog.format(
                'CREATE TRIGGER postback_watch_delete AFTER DELETE ON %s REFERENCING OLD TABLE AS postback_old_rows '
                'FOR EACH STATEMENT EXECUTE FUNCTION %s()', member, qualified);
        END IF;
    END LOOP;
    RETURN pg_catalog.to_regprocedure(qualified || '()');
END
$$;

CREATE FUNCTION postback.unwatch(source regclass) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    fn regprocedure;
BEGIN
    IF source IS NULL THEN
        RAISE EXCEPTION 'source must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF NOT pg_catalog.pg_has_role(current_user, (SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = source), 'USAGE') THEN
        RAISE EXCEPTION 'must be the owner of table % to unwatch it', source USING ERRCODE = 'insufficient_privilege';
    END IF;
    SELECT t.tgfoid INTO fn FROM pg_catalog.pg_trigger t WHERE t.tgrelid = source AND t.tgname = 'postback_watch_insert';
    IF fn IS NULL THEN
        RAISE NOTICE '% is not watched', source;
        RETURN false;
    END IF;
    PERFORM postback.watch_drop_triggers(source);
    EXECUTE pg_catalog.format('DROP FUNCTION %s', fn);
    RETURN true;
END
$$;

-- Watched tables: the mapping is the insert trigger's argument, so that
-- pg_dump/pg_restore keep a watch with its table.
CREATE VIEW postback.watches AS
SELECT t.tgrelid::regclass AS source,
       pg_catalog.convert_from(substr(t.tgargs, 1, octet_length(t.tgargs) - 1),
                               pg_catalog.getdatabaseencoding())::jsonb AS mapping,
       pg_catalog.pg_get_userbyid(c.relowner) AS owner,
       t.tgfoid::regprocedure AS function,
       EXISTS (SELECT 1 FROM pg_catalog.pg_trigger d WHERE d.tgrelid = t.tgrelid AND d.tgname = 'postback_watch_delete') AS on_delete,
       t.tgenabled <> 'D' AS enabled,
       (SELECT count(*)::integer FROM pg_catalog.pg_partition_tree(t.tgrelid) p
         WHERE p.relid <> t.tgrelid
           AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g
                            WHERE g.tgrelid = p.relid AND g.tgname = 'postback_watch_insert')) AS partitions_unwatched
  FROM pg_catalog.pg_trigger t
  JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
 WHERE t.tgname = 'postback_watch_insert' AND t.tgnargs = 1;
