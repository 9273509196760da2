"""The cost known before it runs (issue 15, item 4): the plan's estimate of rows, WAL, time and growth against
a real backfill's measured WAL; the VACUUM (ANALYZE) after the batches; validate's sizes before and after."""

import re
import subprocess

import pytest

from conftest import CORE_ONLY
from runbook_helpers import params as params_mod
from runbook_helpers.backfill import cost as cost_model, vacuuming
from runbook_helpers.phases import backfill, validate

MB = 1024 * 1024
BIG = 150_000  # rows added to knowledge_bases (tenant_id NULL): a WAL volume that dwarfs the phase's other writes


def _lsn(db) -> int:
    return int(db.scalar("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"))


RELATIONS_SQL = """
SELECT concat_ws('/', CASE c.reltablespace WHEN 0 THEN d.dattablespace ELSE c.reltablespace END, d.oid,
                 pg_relation_filenode(c.oid))
FROM pg_class c, pg_database d
WHERE d.datname = current_database() AND (c.oid = %s::regclass OR c.oid IN (SELECT indexrelid FROM pg_index
                                                                           WHERE indrelid = %s::regclass))
"""


def _waldump(db, start: str, end: str) -> list[str]:
    """pg_waldump over [start, end), its first and last segments named: without them pg_waldump learns the
    segment size from whichever file it reads first in pg_wal, and a segment the server is creating meanwhile
    has 0 bytes ('invalid WAL segment size', seen with checkpoints beside the run)."""
    with db.connect() as conn:
        timeline = conn.execute("SELECT timeline_id FROM pg_control_checkpoint()").fetchone()[0]
        seg_size = int(conn.execute("SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'").fetchone()[0])
    per_id = 0x100000000 // seg_size

    def segment(lsn: int) -> str:
        return f"{timeline:08X}{lsn // seg_size // per_id:08X}{lsn // seg_size % per_id:08X}"

    first, last = (int(hi, 16) << 32 | int(lo, 16) for hi, lo in (start.split("/"), end.split("/")))
    return [str(db.server.tool("pg_waldump")), "-p", str(db.server.data_dir / "pg_wal"), "-s", start, "-e", end,
            segment(first), segment(max(first, last - 1))]


def _wal_of(db, table: str, start: str, end: str) -> tuple[int, int]:
    """The bytes of the WAL records between two LSNs that touch `table` or its indexes (pg_waldump
    --relation, once per relation): what other databases on the same server wrote meanwhile left out. Apart:
    the hint-bit images (XLOG/FPI_FOR_HINT: data checksums are on), which the model leaves out; they come from
    pages changed before a checkpoint that falls inside the run and touched again after it."""
    waldump = _waldump(db, start, end)
    total = hints = 0
    with db.connect() as conn:
        relations = [r[0] for r in conn.execute(RELATIONS_SQL, (table, table))]
    for relation in relations:
        out = subprocess.run(waldump + [f"--relation={relation}", "--stats=record"], capture_output=True, text=True)
        found = re.search(r"^Total\s+\d+\s+\d+ \[[^]]*\]\s+\d+ \[[^]]*\]\s+(\d+)", out.stdout, re.M)
        assert found, f"pg_waldump --relation={relation}: {out.stderr[-500:] or out.stdout[-500:]}"
        total += int(found.group(1))
        hint = re.search(r"^XLOG/FPI_FOR_HINT\s+\d+ \([^)]*\)\s+\d+ \([^)]*\)\s+\d+ \([^)]*\)\s+(\d+)",
                         out.stdout, re.M)
        hints += int(hint.group(1)) if hint else 0
    return total - hints, hints


def _checkpoints_in(db, start: str, end: str) -> int:
    """Checkpoints whose redo point lies between two LSNs: each makes the next change of every page log a full
    image again. Other tests start them too (DROP DATABASE at their teardown, CHECKPOINT); PostgreSQL 17+ logs
    a CHECKPOINT_REDO record where a checkpoint's redo point is, before it ends."""
    waldump = _waldump(db, start, end) + ["--rmgr=XLOG"]
    out = subprocess.run(waldump, capture_output=True, text=True)
    assert out.returncode == 0 or "end of WAL" in out.stderr or not out.stderr, out.stderr[-500:]
    return sum(1 for line in out.stdout.splitlines() if "CHECKPOINT_REDO" in line)


def _grow_knowledge_bases(db, rows: int) -> None:
    """Rows like the demo's (a jsonb document, a random uuid), tenant_id NULL: a partly applied 0001."""
    db.execute("INSERT INTO knowledge_bases (uuid, org_id, name, documents, embedding_model) "
               "SELECT gen_random_uuid(), 1 + i %% 7, 'Knowledge base ' || i, "
               "jsonb_build_array(jsonb_build_object('title', 'Doc ' || i, 'pages', 1 + i %% 40)), "
               "'text-embedding-' || (1 + i %% 3) FROM generate_series(1, %s) i", (rows,))
    db.execute("VACUUM (ANALYZE) knowledge_bases")  # statistics for the model; hint bits set, as on a settled table


def test_the_plans_estimate_is_within_a_factor_of_two_of_the_measured_wal(db):
    _grow_knowledge_bases(db, BIG)
    db.run("inspect", "seed")
    nulls = db.scalar("SELECT count(*) FROM knowledge_bases WHERE tenant_id IS NULL")
    # the batches' own WAL: the VACUUMs beside and after them are not in the model
    params = params_mod.override(db.params, {"backfill": {"vacuum_after": False, "vacuum_every_share": None}})
    rb = db.session("backfill", params=params)
    # a temporary replication slot keeps the run's WAL for pg_waldump (other tests' DROP DATABASE checkpoints)
    keep = db.connect(autocommit=True)
    try:
        keep.execute("SELECT pg_create_physical_replication_slot(%s, true, true)", (f"test_cost_{db.name}",))
        report = backfill.cost(rb)
        table = report.table.set_index("table")
        kb = table.loc["knowledge_bases"]
        assert kb["strategy"] == "batched" and kb["rows to rewrite"] == nulls  # exact: the plan's own count
        assert kb["rows from"] == "exact: NULL tenant_id counted"
        assert table.loc["workflows", "rows to rewrite"] == 0 and table.loc["workflows", "WAL (MB)"] == 0
        assert table.loc["total", "rows to rewrite"] == nulls
        assert kb["time (s)"] > 0 and kb["heap growth (MB)"] > 0 and kb["index growth (MB)"] > 0
        assert any("max_wal_size" in line for line in report.warnings)
        # the same model with 1, 2, ... checkpoints inside the run: other tests' checkpoints fall into it (their
        # DROP DATABASE; CI saw 8 on a busy machine), so as many as a checkpoint every 2 MB of the run's WAL
        plans = backfill.plans(rb)
        most = int(report.wal_bytes // (2 * MB))
        if_checkpoints = {k: backfill.cost(rb, plans, checkpoints_seen=k).wal_bytes for k in range(1, most + 1)}
        db.execute("CHECKPOINT")  # every page's next change logs a full-page image, as the model assumes
        start, start_lsn = _lsn(db), db.scalar("SELECT pg_current_wal_lsn()::text")
        backfill.apply(rb)
        measured = _lsn(db) - start
        end_lsn = db.scalar("SELECT pg_current_wal_flush_lsn()::text")
        ours, hints = _wal_of(db, "knowledge_bases", start_lsn, end_lsn)
        seen = _checkpoints_in(db, start_lsn, end_lsn)
    finally:
        rb.close()
        keep.close()  # the temporary slot goes with its session
    assert seen == report.checkpoints or seen in if_checkpoints, f"{seen} checkpoints inside the backfill"
    # with k checkpoints inside, the model's images lie between none (all at one end of the run: the touched
    # pages counted once) and k spread evenly (the most: one image per page touched in each cycle)
    estimated = report.wal_bytes if seen == report.checkpoints else if_checkpoints[seen]
    fewest = report.wal_bytes
    # the whole server's WAL: other tests' databases write meanwhile, so the measure can only be too high
    assert 0.5 * measured <= estimated <= 2.0 * measured, (
        f"estimated {estimated / MB:.1f} MB, measured {measured / MB:.1f} MB")
    # the records of the rewritten table alone (hint-bit images apart: a few pages without a checkpoint inside
    # the run, 15.7 MB with two): the model holds to within a quarter
    assert seen or hints < 0.01 * ours, f"{hints / MB:.1f} MB of hint-bit images without a checkpoint inside the run"
    assert 0.8 * ours <= estimated and fewest <= 1.25 * ours, (
        f"estimated {estimated / MB:.1f} MB with {seen} checkpoints inside, knowledge_bases' WAL {ours / MB:.1f} MB "
        f"and {hints / MB:.1f} MB of hint-bit images (all: {measured / MB:.1f} MB)")
    # the next plan on this database times its batches at the rate the ledger measured for these
    rb = db.session("backfill", dry_run=True)
    try:
        assert backfill.cost(rb).rate.startswith(f"measured here: {nulls:,} rows of earlier batches")
    finally:
        rb.close()


def test_a_warning_line_counts_the_checkpoints_the_wal_forces(db):
    """Against the server's max_wal_size the plan says whether the WAL forces checkpoints; against a small one
    (the DBA's 2M-row run) how many, how often, and that the server log will complain (a warning line: the
    plan still runs)."""
    _grow_knowledge_bases(db, 20_000)
    db.run("inspect", "seed")
    rb = db.session("backfill", dry_run=True)
    try:
        report = backfill.cost(rb)
        with rb.engine.connect() as conn:
            srv = cost_model.server(conn)
            rate = cost_model.rate(conn, None)
    finally:
        rb.close()
    assert report.checkpoints == 0 and report.wal_bytes < srv.wal_per_checkpoint
    assert any("no checkpoint forced by WAL volume" in line for line in report.warnings)
    assert rate.source.startswith("bench B2")  # nothing measured on this database yet
    small = cost_model.Server(srv.block_size, 2 * MB, 0.9, 300, 30, True, "off")
    total = report.table.set_index("table").loc["total"]
    cost = cost_model.Cost(int(total["rows to rewrite"]), 0.0, report.wal_bytes, 0.0, 0.0, 0.0, "pg_stats")
    forced = cost_model.checkpoints(cost.wal_bytes, 5.0, small)
    assert forced == int(report.wal_bytes // (2 * MB / 1.9)) and forced >= 2
    line = next(x for x in backfill._cost_warnings(cost, 5.0, forced, small, rate) if x.startswith("WAL: about"))
    assert f"forces about {forced} checkpoints" in line and "checkpoints are occurring too frequently" in line


def test_room_that_fillfactor_keeps_makes_the_updates_hot_and_the_table_does_not_grow(db):
    """fillfactor 50: every rewritten row fits on its own page (HOT, no index entry): the plan says no growth,
    and the heap indeed keeps its size."""
    _grow_knowledge_bases(db, 20_000)
    db.execute("ALTER TABLE knowledge_bases SET (fillfactor = 50)")
    db.execute("VACUUM (FULL, ANALYZE) knowledge_bases")  # the pages half full (test set-up, not online)
    db.run("inspect", "seed")
    heap = db.scalar("SELECT pg_relation_size('knowledge_bases')")
    rb = db.session("backfill", params=params_mod.override(db.params, {"backfill": {"vacuum_after": False}}))
    try:
        kb = backfill.cost(rb).table.set_index("table").loc["knowledge_bases"]
        backfill.apply(rb)
    finally:
        rb.close()
    assert kb["HOT updates (%)"] == 100 and kb["heap growth (MB)"] == 0 and kb["index growth (MB)"] == 0
    assert db.scalar("SELECT pg_relation_size('knowledge_bases')") == heap
    assert db.scalar("SELECT count(*) FROM knowledge_bases WHERE tenant_id IS NULL") == 0


def _vacuums(db, table: str) -> int:
    return db.scalar("SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = %s", (table,))


def _dead(db, table: str) -> int:
    return db.scalar("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = %s", (table,))


def _not_all_visible(db, table: str) -> int:
    """Pages the visibility map does not mark all-visible: a page with dead row versions never is."""
    db.execute("CREATE EXTENSION IF NOT EXISTS pg_visibility")
    return db.scalar("SELECT count(*) FROM pg_visibility_map(%s::regclass) WHERE NOT all_visible", (table,))


def _no_autovacuum(db) -> None:
    db.execute("ALTER TABLE knowledge_bases SET (autovacuum_enabled = off)")  # only the runbook's VACUUM counts


def test_backfill_vacuums_each_rewritten_table_after_its_batches(migrated_db):
    db = migrated_db("inspect", "seed")
    _no_autovacuum(db)
    before = _vacuums(db, "knowledge_bases")
    rb = db.session("backfill", dry_run=True)
    try:
        plan = backfill.plan(rb)
    finally:
        rb.close()
    vacuums = plan[plan["statement"].str.startswith("VACUUM")]
    assert list(vacuums["table"]) == ["knowledge_bases"]  # the only table the batches rewrite
    assert vacuums["lock"].iloc[0].startswith("SHARE UPDATE EXCLUSIVE")
    out = db.run("backfill")["backfill"]["report"]
    assert out.summary.set_index("table").loc["knowledge_bases", "rows updated"] > 0
    assert _vacuums(db, "knowledge_bases") == before + 1
    assert _dead(db, "knowledge_bases") == 0 and _not_all_visible(db, "knowledge_bases") == 0
    assert db.scalar("SELECT last_analyze IS NOT NULL FROM pg_stat_user_tables WHERE relname = 'knowledge_bases'")
    # journaled like every statement, and not again on a re-run
    journal = "SELECT count(*) FROM tenancy_runbook.statement_journal WHERE statement LIKE 'VACUUM%%' AND outcome = 'applied'"
    assert db.scalar(journal) == 1
    db.run("backfill")
    assert db.scalar(journal) == 1 and _vacuums(db, "knowledge_bases") == before + 1


def test_with_vacuum_after_false_the_dead_versions_stay_for_autovacuum(migrated_db):
    db = migrated_db("inspect", "seed")
    _no_autovacuum(db)
    before = _vacuums(db, "knowledge_bases")
    params = params_mod.override(db.params, {"backfill": {"vacuum_after": False}})
    db.run("backfill", params=params)
    assert _vacuums(db, "knowledge_bases") == before
    assert _dead(db, "knowledge_bases") > 0 and _not_all_visible(db, "knowledge_bases") > 0


def test_a_run_killed_between_the_batches_and_the_vacuum_vacuums_on_the_re_run(migrated_db):
    db = migrated_db("inspect", "seed")
    _no_autovacuum(db)
    before = _vacuums(db, "knowledge_bases")
    db.run("backfill", params=params_mod.override(db.params, {"backfill": {"vacuum_after": False}}))
    db.run("backfill")  # nothing left to fill; the vacuum the first run did not do
    assert _vacuums(db, "knowledge_bases") == before + 1
    assert _dead(db, "knowledge_bases") == 0 and _not_all_visible(db, "knowledge_bases") == 0


HEAP_FETCHES_SQL = """
EXPLAIN (ANALYZE, FORMAT JSON) SELECT count(*) FROM knowledge_bases WHERE id <= %s
"""


def _heap_fetches(db, upto: int) -> int:
    """What the application's index-only scan over the rewritten rows reads from the heap: the rows on pages
    the visibility map does not mark all-visible."""
    with db.connect() as conn:
        conn.execute("SET enable_seqscan = off")
        conn.execute("SET enable_bitmapscan = off")
        plan = conn.execute(HEAP_FETCHES_SQL, (upto,)).fetchone()[0][0]["Plan"]
    while plan.get("Node Type") != "Index Only Scan":
        assert plan.get("Plans"), plan
        plan = plan["Plans"][0]
    return int(plan["Heap Fetches"])


def test_a_vacuum_beside_the_batches_gives_their_pages_back_to_index_only_scans(db, monkeypatch, tmp_path):
    """Every batch clears the all-visible bits of the pages it touches, so the application's index-only scans
    read the heap for those rows until a VACUUM (bench B3: the p99 of a count by org 31 -> 660 ms); beside the
    batches a second session vacuums each time another share of the rows was rewritten (here each 10,000 rows,
    MIN_ROWS). Looked at mid-backfill, paused before batch 21: 20 batches of 2,500 rows rewritten; without the
    VACUUMs every one of them is read from the heap."""
    import threading
    import time

    share = 0.05
    _grow_knowledge_bases(db, 60_000)
    _no_autovacuum(db)
    db.run("inspect", "seed")
    before = _vacuums(db, "knowledge_bases")
    marker = tmp_path / "paused"
    monkeypatch.setenv("RUNBOOK_FAULT", "backfill.before_batch=knowledge_bases#21@pause")
    monkeypatch.setenv("RUNBOOK_FAULT_MARKER", str(marker))
    params = params_mod.override(db.params, {"backfill": {
        "batch_size": 2500, "target_batch_ms": None, "vacuum_after": False, "vacuum_every_share": share,
        "throttle": {"budget_p99_ms": None, "app_stall_ms": None}}})
    lines: list[str] = []
    rb = db.session("backfill", params=params)
    rb.log = lines.append
    failed: list[BaseException] = []

    def apply() -> None:
        try:
            backfill.apply(rb)
        except BaseException as exc:  # noqa: BLE001 - the test's main thread reports it
            failed.append(exc)

    worker = threading.Thread(target=apply)
    worker.start()
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert worker.is_alive() and time.monotonic() < deadline, failed or "batch 16 never came"
            time.sleep(0.05)
        rewritten = db.scalar("SELECT max(id) FROM knowledge_bases WHERE tenant_id IS NOT NULL")
        done = db.scalar("SELECT count(*) FROM knowledge_bases WHERE tenant_id IS NOT NULL AND id <= %s", (rewritten,))
        assert done >= 49_000
        vacuums, since = _vacuums(db, "knowledge_bases"), time.monotonic()
        while time.monotonic() - since < 1.5:  # the VACUUM the last batches made due has finished
            assert time.monotonic() < deadline
            time.sleep(0.1)
            db.execute("SELECT pg_stat_clear_snapshot()")
            if _vacuums(db, "knowledge_bases") != vacuums:
                vacuums, since = _vacuums(db, "knowledge_bases"), time.monotonic()
        fetches = _heap_fetches(db, rewritten)
        pages = db.scalar("SELECT pg_relation_size('knowledge_bases') / current_setting('block_size')::int")
        not_visible = _not_all_visible(db, "knowledge_bases")
    finally:
        marker.unlink(missing_ok=True)
        worker.join(120)
        rb.close()
    assert not failed, failed
    # what the application's index-only scan over the rewritten rows reads from the heap (two visits per row not
    # vacuumed yet: its dead version and its live one), and the pages so marked: at most the rows since the last
    # VACUUM started, MIN_ROWS and a batch (without the VACUUMs: 98,928 fetches, 2,201 of 2,457 pages)
    assert fetches <= 2 * (vacuuming.MIN_ROWS + 2_500), f"{fetches:,} heap fetches for {done:,} rewritten rows; {not_visible} of {pages} " \
                                  f"pages not all-visible; {vacuums - before} VACUUMs beside the batches"
    assert not_visible <= 0.3 * pages
    assert vacuums - before >= 3
    assert any("vacuumed" in line and "times beside the batches" in line for line in lines), lines
    assert db.scalar("SELECT count(*) FROM knowledge_bases WHERE tenant_id IS NULL") == 0


@pytest.fixture
def migrated(migrated_db, ci_params):
    return migrated_db("inspect", "seed", "backfill", "constrain", params=params_mod.override(ci_params, CORE_ONLY))


def test_validate_reports_each_core_tables_size_before_and_after(migrated):
    rb = migrated.session("validate", dry_run=True)
    try:
        frame = validate.sizes(rb).set_index("table")
    finally:
        rb.close()
    assert set(frame.index) == set(migrated.params.tables)
    for column in ("heap before", "heap after", "indexes before", "indexes after", "total before", "total after"):
        assert (frame[column] > 0).all(), column
    kb = frame.loc["knowledge_bases"]
    assert kb["rewritten"] == "yes" and frame.loc["workflows", "rewritten"] == "no"
    assert kb["heap after"] >= kb["heap before"] and kb["total after"] > kb["total before"]
    # constrain's tenant_id index is there after, not before
    assert (frame["indexes after"] > frame["indexes before"]).all()
    recorded = migrated.scalar("SELECT count(*) FROM tenancy_runbook.table_sizes")
    assert recorded == len(migrated.params.tables)
