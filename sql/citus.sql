-- ---------------------------------------------------------------------------
-- Citus, distributed mode: postback.distribute() on the coordinator turns an
-- installed pg_postback into clicks, conversions, deliveries and attempts
-- co-located by click_id, endpoints and endpoint_secrets as reference tables,
-- and every other table (endpoint_state, roll-ups, duplicates) each node's
-- own. Each node's worker then delivers the deliveries of its own shards.
-- ---------------------------------------------------------------------------

-- True when pg_postback's tables are distributed by Citus (on any node).
CREATE FUNCTION postback.is_distributed() RETURNS boolean
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    found boolean;
BEGIN
    IF pg_catalog.to_regclass('pg_catalog.pg_dist_partition') IS NULL THEN
        RETURN false;
    END IF;
    EXECUTE 'SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition p
                             WHERE p.logicalrelid = ''postback.deliveries''::pg_catalog.regclass)' INTO found;
    RETURN found;
END
$$;

-- For a trigger's relation: `logical` (a pg_postback table) as a statement
-- there may name it. On a Citus shard (conversions_102008) that is the shard
-- of `logical` with the same hash range (deliveries_102040): a statement on a
-- shard must never name a distributed table. Elsewhere `postback.<logical>`.
CREATE FUNCTION postback.shard_beside(rel regclass, logical text) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    shard text := pg_catalog.substring(rel::text, '_([0-9]+)$');
    beside text;
BEGIN
    IF shard IS NULL OR pg_catalog.to_regclass('pg_catalog.pg_dist_shard') IS NULL THEN
        RETURN pg_catalog.format('postback.%I', logical);
    END IF;
    EXECUTE 'SELECT pg_catalog.format(''postback.%I'', $2 || ''_'' || t.shardid)
               FROM pg_catalog.pg_dist_shard s JOIN pg_catalog.pg_dist_shard t
                 ON t.logicalrelid = pg_catalog.format(''postback.%I'', $2)::pg_catalog.regclass
                AND t.shardminvalue IS NOT DISTINCT FROM s.shardminvalue
              WHERE s.shardid = $1::bigint'
       INTO beside USING shard, logical;
    RETURN coalesce(beside, pg_catalog.format('postback.%I', logical));
END
$$;

-- This node's shards of a distributed pg_postback table (none when it is not).
CREATE FUNCTION postback.local_shards(logical text) RETURNS SETOF text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT postback.is_distributed() THEN
        RETURN;
    END IF;
    RETURN QUERY EXECUTE
        'SELECT pg_catalog.format(''postback.%I'', $1 || ''_'' || s.shardid)
           FROM pg_catalog.pg_dist_shard s JOIN pg_catalog.pg_dist_placement p USING (shardid)
          WHERE s.logicalrelid = pg_catalog.format(''postback.%I'', $1)::pg_catalog.regclass
            AND p.groupid = (SELECT g.groupid FROM pg_catalog.pg_dist_local_group g)
          ORDER BY s.shardid' USING logical;
END
$$;

-- One node's part of distribute(): keys that include the distribution column
-- (click_id), the deliveries' and attempts' click_id required, the foreign key
-- Citus cannot convert dropped. Run on every node (the same schema
-- everywhere); idempotent; one transaction per node.
CREATE FUNCTION postback.citus_prepare_node() RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_constraint c
                WHERE c.conrelid = 'postback.conversions'::pg_catalog.regclass
                  AND c.conname = 'transaction_id_is_unique_per_click') THEN
        RETURN 'prepared already';
    END IF;
    ALTER TABLE postback.conversions DROP CONSTRAINT conversions_pkey;
    ALTER TABLE postback.conversions ADD PRIMARY KEY (click_id, id);
    ALTER TABLE postback.conversions DROP CONSTRAINT transaction_id_is_unique_use_on_conflict_do_nothing_to_skip;
    ALTER TABLE postback.conversions
        ADD CONSTRAINT transaction_id_is_unique_per_click UNIQUE (click_id, transaction_id);
    ALTER TABLE postback.deliveries ALTER COLUMN click_id SET DEFAULT '';
    ALTER TABLE postback.deliveries ALTER COLUMN click_id SET NOT NULL;
    ALTER TABLE postback.deliveries DROP CONSTRAINT deliveries_pkey;
    ALTER TABLE postback.deliveries ADD PRIMARY KEY (click_id, id);
    -- the worker, retry and the predecessor check find a delivery by id alone
    CREATE INDEX deliveries_id ON postback.deliveries (id);
    ALTER TABLE postback.deliveries DROP CONSTRAINT delivery_idempotency_key_is_unique;
    ALTER TABLE postback.deliveries
        ADD CONSTRAINT delivery_idempotency_key_is_unique UNIQUE (click_id, idempotency_key);
    ALTER TABLE postback.attempts ALTER COLUMN click_id SET DEFAULT '';
    ALTER TABLE postback.attempts ALTER COLUMN click_id SET NOT NULL;
    ALTER TABLE postback.attempts DROP CONSTRAINT attempts_pkey;
    ALTER TABLE postback.attempts ADD PRIMARY KEY (click_id, id);
    ALTER TABLE postback.attempts DROP CONSTRAINT attempt_no_is_unique_per_delivery;
    ALTER TABLE postback.attempts
        ADD CONSTRAINT attempt_no_is_unique_per_delivery UNIQUE (click_id, delivery_id, attempt_no);
    -- Citus converts tables linked by a foreign key through a path that fails
    -- on extension-owned objects: distribute() adds it back afterwards
    ALTER TABLE postback.endpoint_secrets DROP CONSTRAINT endpoint_secrets_endpoint_id_fkey;
    PERFORM postback.citus_views();
    RETURN 'prepared';
END
$$;

-- The views whose joins Citus can run only on the distribution column: the
-- same columns, the conversion and the attempts found beside the delivery (by
-- click_id). Part of citus_prepare_node.
CREATE FUNCTION postback.citus_views() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    propagating text := pg_catalog.current_setting('citus.enable_ddl_propagation', true);
BEGIN
    -- each node's own view (Citus would refuse view DDL on a worker node)
    PERFORM pg_catalog.set_config('citus.enable_ddl_propagation', 'off', true);
    CREATE OR REPLACE VIEW postback.dead_letters AS
    SELECT d.id AS delivery_id, e.name AS endpoint, d.conversion_id, c.transaction_id, c.partner, d.event, d.status,
           d.attempts, d.completed_at AS died_at, d.last_error,
           (SELECT a.status_code FROM postback.attempts a
             WHERE a.click_id = d.click_id AND a.delivery_id = d.id ORDER BY a.attempt_no DESC LIMIT 1)
               AS last_status_code,
           d.created_at
      FROM postback.deliveries d
      JOIN postback.endpoints e ON e.id = d.endpoint_id
      LEFT JOIN postback.conversions c ON c.click_id = d.click_id AND c.id = d.conversion_id
     WHERE d.state = 'dead';
    IF propagating IS NOT NULL THEN
        PERFORM pg_catalog.set_config('citus.enable_ddl_propagation', propagating, true);
    END IF;
END
$$;

-- Every node's pg_postback workers, seen from the coordinator: each node's
-- postback.worker_status(), with the node. A node that cannot be reached is
-- one row saying so. Without Citus: this node's rows.
CREATE FUNCTION postback.cluster_worker_status()
RETURNS TABLE (node text, role text, worker integer, running boolean, pid integer, state text,
               sent bigint, succeeded bigint, failed bigint, in_flight integer, last_error text,
               last_error_at timestamptz, hint text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF pg_catalog.to_regclass('pg_catalog.pg_dist_node') IS NULL THEN
        RETURN QUERY SELECT 'this node'::text, w.role, w.worker, w.running, w.pid, w.state, w.sent, w.succeeded,
                            w.failed, w.in_flight, w.last_error, w.last_error_at, w.hint
                       FROM postback.worker_status() w;
        RETURN;
    END IF;
    RETURN QUERY EXECUTE
        $q$SELECT n.nodename || ':' || n.nodeport, w.role, w.worker, w.running, w.pid,
                  CASE WHEN r.success THEN w.state ELSE 'unreachable: ' || r.result END,
                  w.sent, w.succeeded, w.failed, w.in_flight, w.last_error, w.last_error_at, w.hint
             FROM run_command_on_all_nodes(
                      'SELECT coalesce(pg_catalog.json_agg(w), ''[]'') FROM postback.worker_status() w') r
             JOIN pg_catalog.pg_dist_node n ON n.nodeid = r.nodeid
             LEFT JOIN LATERAL pg_catalog.json_to_recordset(CASE WHEN r.success THEN r.result::json END)
                  AS w(role text, worker integer, running boolean, pid integer, state text, sent bigint,
                       succeeded bigint, failed bigint, in_flight integer, last_error text,
                       last_error_at timestamptz, hint text) ON true
            ORDER BY n.groupid, w.role, w.worker$q$;
END
$$;

-- The one call of distributed mode, on the coordinator. Refuses (changing
-- nothing) without Citus, off the coordinator, or when a worker node lacks
-- pg_postback, runs another version, or does not preload it (its shards'
-- deliveries would never be sent). Distributed already: says so, changes
-- nothing.
CREATE FUNCTION postback.distribute(shard_count integer DEFAULT 32) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    version text := (SELECT e.extversion FROM pg_catalog.pg_extension e WHERE e.extname = 'pg_postback');
    bad text;
    nodes integer;
BEGIN
    IF pg_catalog.to_regclass('pg_catalog.pg_dist_local_group') IS NULL THEN
        RAISE EXCEPTION 'postback.distribute() needs Citus: it is not installed in this database'
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Without Citus pg_postback''s tables stay local; there is nothing to distribute.';
    END IF;
    IF shard_count IS NULL OR shard_count < 1 OR shard_count > 64000 THEN
        RAISE EXCEPTION 'shard_count must be between 1 and 64000 (got %)', shard_count
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    EXECUTE 'SELECT pg_catalog.format(''this is a worker node (group %s); the coordinator is %s'', g.groupid,
                    coalesce((SELECT n.nodename || '':'' || n.nodeport FROM pg_catalog.pg_dist_node n
                               WHERE n.groupid = 0 LIMIT 1), ''not in pg_dist_node''))
               FROM pg_catalog.pg_dist_local_group g WHERE g.groupid <> 0' INTO bad;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'postback.distribute() runs on the coordinator: %', bad
            USING ERRCODE = 'feature_not_supported';
    END IF;
    IF postback.is_distributed() THEN
        RETURN 'distributed already';
    END IF;
    -- every worker node: pg_postback installed at this version and preloaded
    EXECUTE 'SELECT pg_catalog.string_agg(pg_catalog.format(''%s:%s (%s)'', w.nodename, w.nodeport,
                    CASE WHEN NOT w.success THEN w.result
                         WHEN w.result = '''' THEN ''pg_postback is not installed''
                         WHEN pg_catalog.split_part(w.result, '' '', 1) <> $1
                         THEN ''pg_postback '' || pg_catalog.split_part(w.result, '' '', 1) || '', not '' || $1
                         ELSE ''pg_postback is not in shared_preload_libraries: nothing would send its shards'''' deliveries''
                    END), ''; '')
               FROM run_command_on_workers(
                        $q$SELECT coalesce((SELECT e.extversion FROM pg_catalog.pg_extension e
                                             WHERE e.extname = ''pg_postback''), '''')
                                  || '' '' || pg_catalog.current_setting(''shared_preload_libraries'')$q$) w
              WHERE NOT w.success OR pg_catalog.split_part(w.result, '' '', 1) <> $1
                 OR w.result !~ ''pg_postback''' INTO bad USING version;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'postback.distribute() found worker nodes not ready: %', bad
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Every node needs shared_preload_libraries = ''citus,pg_postback'' and pg_postback '
                         || version || ' (CREATE EXTENSION on the coordinator installs it on every node).';
    END IF;
    -- every table it changes, at once and first: a worker claiming or recording meanwhile
    -- waits for the commit instead of holding a table this transaction reaches for later
    -- (a deadlock that undid the whole call)
    LOCK TABLE postback.deliveries, postback.attempts, postback.conversions, postback.clicks,
               postback.endpoints, postback.endpoint_secrets IN ACCESS EXCLUSIVE MODE;
    -- (only the coordinator holds rows) deliveries and attempts written before: their conversion's click (a test
    -- delivery, which has none, gets '')
    UPDATE postback.deliveries d SET click_id = c.click_id
      FROM postback.conversions c WHERE c.id = d.conversion_id AND d.click_id IS NULL;
    UPDATE postback.deliveries d SET click_id = '' WHERE d.click_id IS NULL;
    UPDATE postback.attempts a SET click_id = d.click_id
      FROM postback.deliveries d WHERE d.id = a.delivery_id AND a.click_id IS NULL;
    UPDATE postback.attempts a SET click_id = '' WHERE a.click_id IS NULL;
    PERFORM postback.citus_prepare_node();
    EXECUTE 'SELECT pg_catalog.string_agg(pg_catalog.format(''%s:%s: %s'', w.nodename, w.nodeport, w.result), ''; '')
               FROM run_command_on_workers(''SELECT postback.citus_prepare_node()'') w
              WHERE NOT w.success' INTO bad;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'postback.distribute() could not prepare worker nodes: %', bad
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'Nothing is distributed; the coordinator is unchanged. A worker node''s empty tables '
                           'may have their new keys already (harmless).',
                  HINT = 'Fix the worker node and call postback.distribute() again.';
    END IF;
    -- Citus recreates a reference table's identity sequence: the endpoints'
    -- and secrets' sequences leave the extension first
    ALTER EXTENSION pg_postback DROP SEQUENCE postback.endpoints_id_seq;
    ALTER EXTENSION pg_postback DROP SEQUENCE postback.endpoint_secrets_id_seq;
    -- pg_postback's triggers run on the shards, by design (each reads and
    -- writes only its own shard and the ones beside it)
    SET LOCAL citus.enable_unsafe_triggers = on;
    EXECUTE 'SELECT create_reference_table(''postback.endpoints'')';
    EXECUTE 'SELECT create_reference_table(''postback.endpoint_secrets'')';
    ALTER TABLE postback.endpoint_secrets ADD CONSTRAINT endpoint_secrets_endpoint_id_fkey
        FOREIGN KEY (endpoint_id) REFERENCES postback.endpoints (id) ON DELETE CASCADE;
    -- the rows there are copied into the shards: as in a restore, conversions
    -- that are there already enqueue nothing (their deliveries come along)
    ALTER TABLE postback.conversions DISABLE TRIGGER USER;
    EXECUTE 'SELECT create_distributed_table(''postback.clicks'', ''click_id'', shard_count := $1)' USING shard_count;
    EXECUTE 'SELECT create_distributed_table(''postback.conversions'', ''click_id'', colocate_with := ''postback.clicks'')';
    EXECUTE 'SELECT create_distributed_table(''postback.deliveries'', ''click_id'', colocate_with := ''postback.clicks'')';
    EXECUTE 'SELECT create_distributed_table(''postback.attempts'', ''click_id'', colocate_with := ''postback.clicks'')';
    ALTER TABLE postback.conversions ENABLE TRIGGER USER;
    EXECUTE 'SELECT pg_catalog.count(*) FROM pg_catalog.pg_dist_node n WHERE n.isactive AND n.shouldhaveshards
                AND n.noderole = ''primary''' INTO nodes;
    RETURN pg_catalog.format('distributed: clicks, conversions, deliveries and attempts in %s shards by click_id '
                             'over %s nodes; endpoints and endpoint_secrets on every node', shard_count, nodes);
END
$$;

-- Upgrades of a distributed install: an extension update script changes the
-- coordinator's tables, while each node's shards and the worker nodes' own
-- tables need the same change made by a procedure that knows them. Until a
-- release ships one, ALTER EXTENSION pg_postback UPDATE on a distributed
-- install is refused before anything changes, on any node, with the steps.
CREATE FUNCTION postback.refuse_distributed_update() RETURNS event_trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF pg_catalog.current_query() ~* 'alter\s+extension\s+("?)pg_postback\1\s+update'
       AND postback.is_distributed()
       AND coalesce(pg_catalog.current_setting('postback.allow_distributed_update', true), '') <> 'on' THEN
        RAISE EXCEPTION 'pg_postback''s tables are distributed by Citus: ALTER EXTENSION pg_postback UPDATE would change '
                        'the coordinator''s tables and not the shards on the worker nodes'
            USING ERRCODE = 'feature_not_supported',
                  DETAIL = 'Nothing was changed on any node.',
                  HINT = 'Read the new release''s notes, "Upgrading a distributed install": when they say its upgrade '
                         'handles distributed tables, run SET postback.allow_distributed_update = on; in the same '
                         'session first. Otherwise stay on this version.';
    END IF;
END
$$;

CREATE EVENT TRIGGER postback_refuse_distributed_update ON ddl_command_start
    WHEN TAG IN ('ALTER EXTENSION')
    EXECUTE FUNCTION postback.refuse_distributed_update();
