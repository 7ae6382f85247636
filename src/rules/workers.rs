//! Which delivery workers run (pure): the databases listed in
//! `postback.database_name`, how many delivery workers each gets
//! (`postback.workers`, plus one maintenance worker) and how long the launcher waits before it starts a worker that stopped
//! again. Worker `index` of `count` owns the endpoints whose id modulo `count`
//! is `index` (the claim query says so in SQL): one owner per endpoint.

use std::time::Duration;

/// Most workers the launcher runs at once, over all databases (shared-memory slots).
pub const MAX_WORKERS: usize = 32;
/// Most workers one database may get.
pub const MAX_PER_DATABASE: i32 = 16;
/// Longest database name PostgreSQL accepts (NAMEDATALEN - 1).
pub const MAX_NAME_BYTES: usize = 63;

/// One worker the launcher should run: database, its index among that
/// database's delivery workers and how many the database has; or the
/// database's maintenance worker (roll-up, purge, auto-disable), which
/// delivers nothing, so that no delivery waits while history is counted or
/// deleted.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Assignment {
    pub database: String,
    pub index: u32,
    pub count: u32,
    pub maintenance: bool,
}

impl Assignment {
    /// "worker 2/3" or "maintenance worker", for log lines and process names.
    pub fn describe(&self) -> String {
        if self.maintenance {
            "maintenance worker".to_string()
        } else {
            format!("worker {}/{}", self.index + 1, self.count)
        }
    }
}

/// Parses `postback.database_name`: one database name or a comma-separated
/// list (spaces around names ignored, a name in double quotes kept as
/// written). Refuses empty names, duplicates and over-long names.
pub fn parse_databases(text: &str) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for raw in split_list(text)? {
        let name = raw.trim();
        let name = match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
            Some(quoted) => quoted.replace("\"\"", "\""),
            None => name.to_string(),
        };
        if name.is_empty() {
            return Err(format!("an empty database name in \"{text}\": list database names separated by commas"));
        }
        if name.len() > MAX_NAME_BYTES {
            return Err(format!("database name \"{name}\" is longer than {MAX_NAME_BYTES} bytes"));
        }
        if out.contains(&name) {
            return Err(format!("database \"{name}\" is listed twice"));
        }
        out.push(name);
    }
    if out.is_empty() {
        return Err("no database named: list at least one database (e.g. 'postgres')".to_string());
    }
    Ok(out)
}

/// Splits on commas outside double quotes.
fn split_list(text: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in text.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if quoted {
        return Err(format!("an unterminated double quote in \"{text}\""));
    }
    parts.push(&text[start..]);
    Ok(parts)
}

/// Workers per database when `postback.workers` is 0 (automatic): one per
/// two CPU cores, at least one, at most four (the claim and record SQL of a
/// worker takes a core; the rest of the machine serves the database).
pub fn automatic_workers(cpus: usize) -> u32 {
    (cpus / 2).clamp(1, 4) as u32
}

/// The workers to run: each database its `per_database` delivery workers and
/// one maintenance worker, in the order listed, as long as MAX_WORKERS slots
/// last. Also returns the databases left without workers because the slots ran out.
pub fn plan(databases: &[String], per_database: u32) -> (Vec<Assignment>, Vec<String>) {
    let per_database = per_database.max(1);
    let mut out = Vec::new();
    let mut left = Vec::new();
    for database in databases {
        if out.len() + per_database as usize + 1 > MAX_WORKERS {
            left.push(database.clone());
            continue;
        }
        for index in 0..per_database {
            out.push(Assignment { database: database.clone(), index, count: per_database, maintenance: false });
        }
        out.push(Assignment { database: database.clone(), index: 0, count: per_database, maintenance: true });
    }
    (out, left)
}

/// How long the launcher waits before starting a worker again after it
/// stopped: 1 s after a worker that ran for a minute or more, doubling after
/// each quick stop (a database that does not exist) up to a minute.
pub fn restart_delay(previous: Option<Duration>, ran_for: Duration) -> Duration {
    const FIRST: Duration = Duration::from_secs(1);
    const LONGEST: Duration = Duration::from_secs(60);
    match previous {
        Some(d) if ran_for < LONGEST => (d * 2).min(LONGEST),
        _ => FIRST,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_name_or_a_list() {
        assert_eq!(parse_databases("postgres").unwrap(), vec!["postgres"]);
        assert_eq!(parse_databases(" shop_a , shop_b,shop_c ").unwrap(), vec!["shop_a", "shop_b", "shop_c"]);
        assert_eq!(parse_databases("\"a,b\", c").unwrap(), vec!["a,b", "c"]);
        assert_eq!(parse_databases("\"say \"\"hi\"\"\"").unwrap(), vec!["say \"hi\""]);
    }

    #[test]
    fn bad_lists_are_refused_with_the_reason() {
        assert!(parse_databases("").unwrap_err().contains("empty database name"));
        assert!(parse_databases("a,,b").unwrap_err().contains("empty database name"));
        assert!(parse_databases("a, a").unwrap_err().contains("listed twice"));
        assert!(parse_databases("\"a").unwrap_err().contains("unterminated"));
        assert!(parse_databases(&"x".repeat(64)).unwrap_err().contains("longer than 63"));
    }

    #[test]
    fn automatic_count_follows_the_cores() {
        assert_eq!(automatic_workers(1), 1);
        assert_eq!(automatic_workers(2), 1);
        assert_eq!(automatic_workers(4), 2);
        assert_eq!(automatic_workers(64), 4);
    }

    #[test]
    fn plan_gives_each_database_its_workers_until_slots_run_out() {
        let dbs = vec!["a".to_string(), "b".to_string()];
        let (p, left) = plan(&dbs, 2);
        assert_eq!(p.len(), 6);
        assert_eq!(p[4], Assignment { database: "b".into(), index: 1, count: 2, maintenance: false });
        assert_eq!(p[5], Assignment { database: "b".into(), index: 0, count: 2, maintenance: true });
        assert_eq!(p[5].describe(), "maintenance worker");
        assert_eq!(p[4].describe(), "worker 2/2");
        assert!(left.is_empty());
        let many: Vec<String> = (0..20).map(|i| format!("db{i}")).collect();
        let (p, left) = plan(&many, 2);
        assert_eq!(p.len(), 30);
        assert_eq!(left, vec!["db10", "db11", "db12", "db13", "db14", "db15", "db16", "db17", "db18", "db19"]);
    }

    #[test]
    fn restarts_back_off_only_while_workers_stop_quickly() {
        let s = Duration::from_secs;
        assert_eq!(restart_delay(None, s(0)), s(1));
        assert_eq!(restart_delay(Some(s(1)), s(0)), s(2));
        assert_eq!(restart_delay(Some(s(32)), s(3)), s(60));
        assert_eq!(restart_delay(Some(s(60)), s(3)), s(60));
        assert_eq!(restart_delay(Some(s(60)), s(600)), s(1));
    }
}
