"""Helpers the end-to-end tests share."""

import itertools

counter = itertools.count()


def scoped_endpoint(conn, url, prefix="ep", **options):
    """An endpoint that receives only conversions whose event is its own name."""
    name = f"{prefix}{next(counter)}"
    cols = ["name", "url_template", "events"] + list(options)
    vals = [name, url, [name]] + list(options.values())
    conn.execute(f"INSERT INTO postback.endpoints ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(vals))})", vals)
    return name


def convert_for(conn, event, n=1, tx=None):
    """n conversions of `event` (one with transaction id `tx` when given); returns the transaction id prefix."""
    if tx is not None:
        conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event) VALUES ('c', %s, %s)",
                     (tx, event))
        return tx
    prefix = f"{event}-{next(counter)}"
    conn.execute("INSERT INTO postback.conversions (click_id, transaction_id, event) "
                 "SELECT 'c' || g, %s || '-' || g, %s FROM generate_series(1, %s) g", (prefix, event, n))
    return prefix
