//! The catalog: comments, search paths, privileges, pg_dump, the worker's status, and Rust enumerations against CHECK constraints.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[allow(unused_imports)]
    use crate::sql_tests::helpers::*;

    #[pg_test]
    fn worker_status_looks_for_the_worker_type_the_worker_registers() {
        let body =
            Spi::get_one::<String>("SELECT prosrc FROM pg_proc WHERE oid = 'postback.worker_status()'::regprocedure")
                .unwrap()
                .unwrap();
        assert!(body.contains(&format!("'{}'", crate::worker::WORKER_TYPE)), "{body}");
    }

    #[pg_test]
    fn rust_enumerations_and_check_constraints_agree() {
        let owned = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            check_values("postback.conversions", "status_must_be_a_known_conversion_status"),
            owned(crate::rules::conversion_rules::STATUSES)
        );
        assert_eq!(
            check_values("postback.deliveries", "delivery_method_must_be_get_post_put_or_patch"),
            owned(crate::rules::outgoing::METHODS)
        );
        assert_eq!(
            check_values("postback.endpoints", "endpoint_method_must_be_get_post_put_or_patch"),
            owned(crate::rules::outgoing::METHODS)
        );
        assert_eq!(
            check_values("postback.endpoints", "endpoint_kind_must_be_postback_or_webhook"),
            owned(crate::rules::outgoing::KINDS)
        );
        let mut schemes = vec!["none".to_string()];
        schemes.extend(owned(crate::rules::signing::SCHEME_NAMES));
        assert_eq!(check_values("postback.endpoints", "endpoint_signing_scheme_must_be_known"), schemes);
        for name in crate::rules::signing::SCHEME_NAMES {
            crate::rules::signing::Scheme::parse(name).unwrap();
        }
        assert_eq!(
            check_values("postback.deliveries", "delivery_state_must_be_pending_in_flight_succeeded_or_dead"),
            owned(&["pending", "in_flight", "succeeded", "dead"])
        );
        assert_eq!(
            check_values("postback.attempts", "attempt_outcome_must_be_succeeded_retry_or_dead"),
            crate::rules::retry::Outcome::ALL.iter().map(|o| o.as_str().to_string()).collect::<Vec<_>>()
        );
    }

    /// Every table, view, column and function of the extension carries a COMMENT.
    #[pg_test]
    fn every_object_is_commented() {
        let missing = Spi::get_one::<String>(
            "WITH members AS (
                 SELECT classid, objid FROM pg_depend d
                  JOIN pg_extension e ON e.oid = d.refobjid AND d.refclassid = 'pg_extension'::regclass
                 WHERE e.extname = 'pg_postback' AND d.deptype = 'e'),
             objects AS (
                 SELECT c.oid::regclass::text AS name, obj_description(c.oid, 'pg_class') AS comment
                   FROM members m JOIN pg_class c ON m.classid = 'pg_class'::regclass AND c.oid = m.objid
                  WHERE c.relkind IN ('r', 'v', 'm')
                 UNION ALL
                 SELECT c.oid::regclass::text || '.' || a.attname, col_description(c.oid, a.attnum)
                   FROM members m JOIN pg_class c ON m.classid = 'pg_class'::regclass AND c.oid = m.objid
                   JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                  WHERE c.relkind IN ('r', 'v', 'm')
                 UNION ALL
                 SELECT p.oid::regprocedure::text, obj_description(p.oid, 'pg_proc')
                   FROM members m JOIN pg_proc p ON m.classid = 'pg_proc'::regclass AND p.oid = m.objid)
             SELECT string_agg(name, ', ' ORDER BY name) FROM objects WHERE (comment IS NULL OR comment = '') AND name NOT LIKE 'tests.%'",
        )
        .unwrap();
        assert_eq!(missing, None, "objects without COMMENT: {missing:?}");
    }

    #[pg_test]
    fn worker_status_explains_a_missing_worker() {
        let (running, hint) =
            Spi::get_two::<bool, String>("SELECT running, hint FROM postback.worker_status()").unwrap();
        assert_eq!(running, Some(false));
        assert!(hint.unwrap().contains("shared_preload_libraries"));
    }

    /// Supabase's linter calls a function without a pinned search_path
    /// `function_search_path_mutable`: every SQL and PL/pgSQL function of the
    /// schema, and every SECURITY DEFINER one whatever its language, pins it.
    #[pg_test]
    fn every_function_pins_its_search_path() {
        let unpinned = Spi::get_one::<String>(
            "SELECT string_agg(p.oid::regprocedure::text, ', ')
               FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
              WHERE p.pronamespace = 'postback'::regnamespace
                AND (l.lanname IN ('sql', 'plpgsql') OR p.prosecdef)
                AND NOT coalesce('search_path=pg_catalog, pg_temp' = ANY (p.proconfig), false)",
        )
        .unwrap();
        assert_eq!(unpinned, None, "functions without a pinned search_path");
        let definers =
            count("SELECT count(*) FROM pg_proc WHERE pronamespace = 'postback'::regnamespace AND prosecdef");
        assert!(definers >= 3, "the enqueue triggers and preview run as the owner");
    }

    #[pg_test]
    fn internal_functions_are_not_executable_by_public() {
        for f in [
            "postback.sign_request(bigint, text, text, text, text, text, text, jsonb, jsonb, text, text)",
            "postback.render_request(bigint, text, text, text, jsonb, jsonb, boolean, bigint, text, text, text, text, text, text, jsonb, timestamptz)",
            "postback.preview(text, bigint)",
            "postback.grant_operator(regrole)",
            "postback.grant_analyst(regrole)",
            "postback.wake_worker()",
            "postback.watch(regclass, jsonb)",
        ] {
            let public = Spi::get_one_with_args::<bool>(
                "SELECT coalesce(bool_or(a.grantee = 0), false)
                   FROM pg_proc p, aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
                  WHERE p.oid = $1::regprocedure AND a.privilege_type = 'EXECUTE'",
                &[f.into()],
            )
            .unwrap();
            assert_eq!(public, Some(false), "{f} is executable by PUBLIC");
        }
    }

    #[pg_test]
    fn pg_dump_keeps_every_table_with_user_data_and_its_sequence() {
        let dumped = Spi::get_one::<String>(
            "SELECT string_agg(c.relname, ',' ORDER BY c.relname)
               FROM pg_extension x, unnest(x.extconfig) AS t(oid) JOIN pg_class c ON c.oid = t.oid
              WHERE x.extname = 'pg_postback'",
        )
        .unwrap();
        assert_eq!(
            dumped.as_deref(),
            Some(
                "attempt_rollup,attempts,attempts_id_seq,clicks,conversion_duplicates,conversion_duplicates_id_seq,\
                 conversion_rollup,conversion_rollup_changes,conversion_rollup_changes_id_seq,conversions,\
                 conversions_id_seq,deliveries,deliveries_id_seq,delivery_rollup,endpoint_secrets,\
                 endpoint_secrets_id_seq,endpoints,endpoints_id_seq,rollup_state"
            )
        );
    }
}
