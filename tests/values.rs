//! Every value PostgreSQL can store survives pgferry's encoding exactly.
//!
//! Two layers:
//! - a property test of the pure encoder against PostgreSQL's own text output: the server
//!   generates random values of every type family (several seeds, extremes included), pgferry
//!   encodes their text output to JSON and decodes it back to input text, and the server
//!   checks that the result equals the original (`IS NOT DISTINCT FROM` where the type has an
//!   equality, and identical text output always);
//! - end to end: one table with a column of each family, rows of extreme values, captured,
//!   sent through Kafka and applied to a replica, compared there column by column.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::broker::Broker;
use common::ferry::Ferry;
use common::pg::PgCluster;
use pgferry::apply::params::json_to_text;
use pgferry::apply::target::TextParam;
use pgferry::pg::session_options;
use pgferry::source::catalog::resolve_types;
use pgferry::value::{text_to_json, TypeRegistry};
use serde_json::value::RawValue;
use tokio_postgres::{Client, NoTls};

fn broker() -> &'static Broker {
    static BROKER: OnceLock<Broker> = OnceLock::new();
    BROKER.get_or_init(Broker::start)
}

/// User types the families below use.
const USER_TYPES: &str = "
    CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy', 'it''s \"quoted\"');
    CREATE DOMAIN posint AS int CHECK (VALUE > 0);
    CREATE TYPE pair AS (a int, b text, c numeric);
";

/// (SQL type, whether it has an equality operator, generator of one random value). The
/// generators use `random()`, so `setseed` makes a run reproducible.
const FAMILIES: &[(&str, bool, &str)] = &[
    ("smallint", true, "(random() * 65535 - 32768)::int::smallint"),
    ("int", true, "(random() * 4294967295 - 2147483648)::bigint::int"),
    ("bigint", true, "((random() - 0.5) * 18446744073709551615)::numeric::bigint"),
    ("oid", true, "(random() * 4294967295)::bigint::oid"),
    ("numeric", true, "(CASE (random() * 5)::int WHEN 0 THEN 'NaN' WHEN 1 THEN 'Infinity' WHEN 2 THEN '-Infinity' ELSE ((random() - 0.5) * 10 ^ (random() * 60)::int)::numeric(1000, 40)::text END)::numeric"),
    ("numeric(12,4)", true, "((random() - 0.5) * 1e8)::numeric(12,4)"),
    ("real", true, "(CASE (random() * 6)::int WHEN 0 THEN 'NaN' WHEN 1 THEN '-Infinity' WHEN 2 THEN '-0' WHEN 3 THEN '1.4e-45' ELSE ((random() - 0.5) * 10 ^ (random() * 70 - 35))::text END)::real"),
    ("double precision", true, "(CASE (random() * 6)::int WHEN 0 THEN 'NaN' WHEN 1 THEN 'Infinity' WHEN 2 THEN '-0' WHEN 3 THEN '4.9e-324' ELSE ((random() - 0.5) * 10 ^ (random() * 600 - 300))::text END)::float8"),
    ("money", true, "((random() - 0.5) * 1.8e17)::numeric(20,2)::money"),
    ("boolean", true, "random() < 0.5"),
    ("text", true, "(SELECT string_agg(chr((ARRAY[34, 92, 10, 9, 44, 123, 125, 32, 39, 233, 8364, 128512, 65 + (random() * 25)::int])[1 + (random() * 12)::int]), '') FROM generate_series(0, (random() * 12)::int))"),
    ("varchar(20)", true, "left(md5(random()::text), (random() * 20)::int)"),
    ("char(5)", true, "left(md5(random()::text), (random() * 5)::int)::char(5)"),
    ("\"char\"", true, "chr(1 + (random() * 126)::int)::\"char\""),
    ("name", true, "md5(random()::text)::name"),
    ("bytea", true, "decode(md5(random()::text) || md5(random()::text), 'hex')"),
    ("uuid", true, "md5(random()::text)::uuid"),
    ("date", true, "CASE (random() * 8)::int WHEN 0 THEN 'infinity'::date WHEN 1 THEN '-infinity'::date WHEN 2 THEN '4713-01-01 BC'::date WHEN 3 THEN '5874897-12-31'::date ELSE date '2000-01-01' + (-2451545 + floor(random() * 2147000000))::int END"),
    ("timestamp", true, "CASE (random() * 8)::int WHEN 0 THEN 'infinity'::timestamp WHEN 1 THEN '-infinity'::timestamp WHEN 2 THEN '294276-12-31 23:59:59.999999'::timestamp WHEN 3 THEN '4713-01-01 00:00:00 BC'::timestamp ELSE timestamp '4713-01-01 00:00:00 BC' + floor(random() * 109000000)::int * interval '1 day' + floor(random() * 86400000000)::bigint * interval '1 microsecond' END"),
    ("timestamptz", true, "CASE (random() * 8)::int WHEN 0 THEN 'infinity'::timestamptz WHEN 1 THEN '-infinity'::timestamptz WHEN 2 THEN '294276-12-31 23:59:59.999999+00'::timestamptz WHEN 3 THEN '4713-01-01 00:00:00+00 BC'::timestamptz ELSE timestamptz '4713-01-01 00:00:00+00 BC' + floor(random() * 109000000)::int * interval '1 day' + floor(random() * 86400000000)::bigint * interval '1 microsecond' END"),
    ("time", true, "CASE (random() * 5)::int WHEN 0 THEN '24:00:00'::time ELSE make_time((random() * 23)::int, (random() * 59)::int, (random() * 59.999999)::numeric(8,6)::float8) END"),
    ("timetz", true, "(make_time((random() * 23)::int, (random() * 59)::int, 1.5)::text || (ARRAY['+00', '+05:30', '-15:59', '+14'])[1 + (random() * 3)::int])::timetz"),
    ("interval", true, "CASE (random() * 5)::int WHEN 0 THEN '178000000 years'::interval WHEN 1 THEN '-178000000 years -2147483647 days -2562047788:00:54.775807'::interval ELSE make_interval((random() * 1000)::int, (random() * 100 - 50)::int, 0, (random() * 1e5)::int, 0, 0, (random() * 1e6 - 5e5)) END"),
    ("json", false, "(ARRAY[' {\"a\": 1,  \"a\": 2} ', '\"\\ud800\"', '[1, 2.000, 1e400]', 'null', '{\"k\": \"' || md5(random()::text) || '\"}', E'[\\n]'])[1 + (random() * 5)::int]::json"),
    ("jsonb", true, "(ARRAY[repeat('[', 300) || '1' || repeat(']', 300), '{\"big\": 123456789012345678901234567890.123, \"u\": \"\\u00e9\\ud83d\\ude00\"}', 'null', '\"text\"', '{\"k\": [' || (random() * 1e6)::int || ', null, true]}'])[1 + (random() * 4)::int]::jsonb"),
    ("int[]", true, "CASE (random() * 4)::int WHEN 0 THEN '[0:2]={1,NULL,3}'::int[] WHEN 1 THEN '{{1,2},{3,4}}'::int[] WHEN 2 THEN '{}'::int[] ELSE ARRAY[(random() * 100)::int, NULL, -(random() * 100)::int] END"),
    ("text[]", true, "ARRAY['NULL', NULL, '', 'a,b', '{x}', E'q\"\\\\', md5(random()::text)]"),
    ("jsonb[]", true, "CASE (random() * 2)::int WHEN 0 THEN ARRAY['[1, 2]'::jsonb, NULL, '{\"a\": \"b\"}', 'null'] ELSE ARRAY[['1'::jsonb, '[2]'::jsonb], ['{}'::jsonb, 'null'::jsonb]] END"),
    ("json[]", false, "ARRAY[' [1,  2] '::json, NULL, '\"\\ud800\"']"),
    ("box[]", false, "ARRAY[box(point(random(), random()), point(random(), random())), '(1,1),(0,0)']"),
    ("date[]", true, "ARRAY['12345-06-07'::date, '0044-03-15 BC', 'infinity', NULL]"),
    ("int4range", true, "(ARRAY['empty', '[1,10)', '(,5]', '[3,)'])[1 + (random() * 3)::int]::int4range"),
    ("numrange", true, "numrange(-(random() * 1e6)::numeric(12,3), (random() * 1e6)::numeric(12,3), '[]')"),
    ("tstzrange", true, "tstzrange('-infinity', now() - random() * interval '1000 years', '(]')"),
    ("int4multirange", true, "int4multirange(int4range(1, 3), int4range(5 + (random() * 10)::int, 100))"),
    ("point", false, "point((random() - 0.5) * 1e300, random())"),
    ("line", false, "line(point(random(), random()), point(random() + 1, random()))"),
    ("lseg", false, "lseg(point(random(), random()), point(random(), random()))"),
    ("box", false, "box(point(random(), random()), point(random(), random()))"),
    ("path", false, "(CASE WHEN random() < 0.5 THEN '[(0,0),(1,1),(2,0.5)]' ELSE '((0,0),(1,1),(2,0.1234567890123))' END)::path"),
    ("polygon", false, "polygon(box(point(random(), random()), point(random(), random())))"),
    ("circle", false, "circle(point(random(), random()), random() * 100)"),
    ("bit(12)", true, "(floor(random() * 4096))::int::bit(12)"),
    ("varbit", true, "left((floor(random() * 4294967295))::bigint::bit(40)::text, (random() * 40)::int)::varbit"),
    ("xml", false, "('<a x=\"' || md5(random()::text) || '\">t &amp; &lt;<b/></a>')::xml"),
    ("tsvector", true, "to_tsvector('english', 'The quick brown fox ' || md5(random()::text)) || E'''it''''s'':5 \\\\x'::tsvector"),
    ("tsquery", true, "('fox & !' || left(md5(random()::text), 5))::tsquery"),
    ("inet", true, "(ARRAY['192.168.1.' || (random() * 255)::int || '/24', '::ffff:1.2.3.4', '2001:db8::' || (random() * 9999)::int || '/64'])[1 + (random() * 2)::int]::inet"),
    ("cidr", true, "(ARRAY['10.0.0.0/8', '2001:db8::/32', '192.168.' || (random() * 255)::int || '.0/24'])[1 + (random() * 2)::int]::cidr"),
    ("macaddr", true, "(substr(md5(random()::text), 1, 12))::macaddr"),
    ("macaddr8", true, "(substr(md5(random()::text), 1, 16))::macaddr8"),
    ("pg_lsn", true, "(to_hex(floor(random() * 4294967295)::bigint) || '/' || to_hex(floor(random() * 2147483647)::int))::pg_lsn"),
    ("mood", true, "(enum_range(NULL::mood))[1 + (random() * 3)::int]"),
    ("mood[]", true, "enum_range(NULL::mood)"),
    ("posint", true, "1 + (random() * 1000)::int"),
    ("posint[]", true, "ARRAY[1 + (random() * 1000)::int, NULL]::posint[]"),
    ("pair", true, "ROW((random() * 100)::int, CASE WHEN random() < 0.3 THEN NULL ELSE 'x, \"y\" (z)' END, (random() * 1e10)::numeric(14,3))::pair"),
    ("pair[]", true, "ARRAY[ROW(1, 'a\"b', 2.5)::pair, NULL, ROW(NULL, NULL, NULL)::pair]"),
];

/// Rows per family and seed.
const ROWS: i32 = 60;
const SEEDS: [f64; 3] = [0.11, 0.47, 0.83];

/// A client with pgferry's pinned session settings (DateStyle, TimeZone, lc_monetary, …).
async fn pinned_client(pg: &PgCluster, db: &str) -> Client {
    let url = format!(
        "{}?options={}",
        pg.url(db),
        session_options(None)
            .replace(' ', "%20")
            .replace('=', "%3D")
    );
    let (client, conn) = tokio_postgres::connect(&url, NoTls)
        .await
        .expect("connect with pinned settings");
    tokio::spawn(conn);
    client
}

/// Property: for random values of every family, decode(encode(text output)) is the value.
#[tokio::test(flavor = "multi_thread")]
async fn encoder_round_trips_postgresql_text_output() {
    let pg = PgCluster::shared();
    let (db, _) = pg.fresh_db("valueprop", USER_TYPES).await;
    let c = pinned_client(pg, &db).await;
    let mut checked = 0;
    for (ty, has_equality, generator) in FAMILIES {
        for seed in SEEDS {
            c.batch_execute(&format!(
                "DROP TABLE IF EXISTS gen; SELECT setseed({seed});
                 CREATE TABLE gen AS SELECT i AS id, ({generator})::{ty} AS v
                   FROM generate_series(1, {ROWS}) AS i;"
            ))
            .await
            .unwrap_or_else(|e| panic!("generating {ty}: {e:?}"));
            let oid: u32 = c
                .query_one("SELECT atttypid FROM pg_attribute WHERE attrelid = 'gen'::regclass AND attname = 'v'", &[])
                .await
                .unwrap()
                .get(0);
            let mut types = TypeRegistry::default();
            resolve_types(&c, &mut types, [oid]).await.unwrap();
            let pg_type = types.resolve(oid);
            let rows = c
                .simple_query("SELECT id, v FROM gen ORDER BY id")
                .await
                .unwrap();
            let (mut ids, mut decoded) = (Vec::new(), Vec::new());
            for row in rows {
                let tokio_postgres::SimpleQueryMessage::Row(row) = row else {
                    continue;
                };
                let id: i32 = row.get(0).unwrap().parse().unwrap();
                let back = row.get(1).map(|text| {
                    let json = text_to_json(&pg_type, text)
                        .unwrap_or_else(|e| panic!("{ty} seed {seed}: encode {text:?}: {e}"));
                    if json.is_null() {
                        // The JSON literal null of a json/jsonb column: the envelope lists
                        // it in `json_null`, and apply binds the text `null`.
                        return "null".to_owned();
                    }
                    let wire = serde_json::to_string(&json).unwrap();
                    let raw = RawValue::from_string(wire.clone()).unwrap();
                    json_to_text(&pg_type, &raw)
                        .unwrap_or_else(|e| panic!("{ty}: decode {wire}: {e}"))
                        .unwrap_or_else(|| panic!("{ty}: {text:?} decoded to NULL"))
                });
                ids.push(id);
                decoded.push(back);
            }
            assert_eq!(ids.len(), ROWS as usize, "{ty}");
            let equality = if *has_equality {
                format!("g.v IS DISTINCT FROM u.d::{ty} OR ")
            } else {
                String::new()
            };
            let bad = c
                .query(
                    &format!(
                        "SELECT g.id, g.v::text, u.d FROM gen g JOIN unnest($1::int[], $2::text[]) AS u(id, d) USING (id)
                          WHERE {equality} g.v::text IS DISTINCT FROM u.d::{ty}::text"
                    ),
                    &[&ids, &decoded],
                )
                .await
                .unwrap_or_else(|e| panic!("{ty}: comparing: {e:?}"));
            let shown: Vec<(i32, Option<String>, Option<String>)> =
                bad.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
            assert!(
                shown.is_empty(),
                "{ty} (seed {seed}) did not round-trip: {shown:?}"
            );
            checked += ROWS;
        }
    }
    assert_eq!(
        checked as usize,
        FAMILIES.len() * SEEDS.len() * ROWS as usize
    );
}

/// Acceptance 1: a table with a column of every family, rows of extreme values (and random
/// ones), replicated master → Kafka → replica, equal there under `IS NOT DISTINCT FROM`.
#[tokio::test(flavor = "multi_thread")]
async fn every_type_family_replicates_exactly() {
    let pg = PgCluster::shared();
    let columns: Vec<String> = FAMILIES
        .iter()
        .enumerate()
        .map(|(i, (ty, _, _))| format!("c{i} {ty}"))
        .collect();
    let ddl = format!(
        "{USER_TYPES} CREATE TABLE wide (id int PRIMARY KEY, {});",
        columns.join(", ")
    );
    let (master, m) = pg.fresh_db("valuesm", &ddl).await;
    let (replica, _) = pg.fresh_db("valuesr", &ddl).await;
    let generators: Vec<String> = FAMILIES
        .iter()
        .map(|(ty, _, g)| format!("({g})::{ty}"))
        .collect();
    // Rows there before capture starts arrive by the snapshot, in `rows` items (the source's
    // text output in COPY's format, written with COPY), the rest by the stream.
    m.batch_execute(&format!(
        "SELECT setseed(0.31);
         INSERT INTO wide SELECT i, {} FROM generate_series(100, 700) AS i;
         INSERT INTO wide (id) VALUES (99);",
        generators.join(", ")
    ))
    .await
    .expect("write extreme rows for the snapshot");
    let capture = Ferry::capture(pg, &master, &broker().address(), "");
    capture.wait_ready().await;
    let applier = Ferry::applier(&master, &[pg.url(&replica)], &broker().address(), "");
    let rows = 40;
    m.batch_execute(&format!(
        "SELECT setseed(0.29);
         INSERT INTO wide SELECT i, {} FROM generate_series(1, {rows}) AS i;
         INSERT INTO wide (id) VALUES (0);
         UPDATE wide SET c0 = c0 WHERE id % 3 = 0;
         DELETE FROM wide WHERE id = 7;",
        generators.join(", ")
    ))
    .await
    .expect("write extreme rows");
    let r = pinned_client(pg, &replica).await;
    let mm = pinned_client(pg, &master).await;
    let expected: i64 = mm
        .query_one("SELECT count(*) FROM wide", &[])
        .await
        .unwrap()
        .get(0);
    common::wait_for(
        "the replica to hold every row",
        Duration::from_secs(90),
        || async {
            let n: i64 = r
                .query_one("SELECT count(*) FROM wide", &[])
                .await
                .ok()?
                .get(0);
            (n == expected).then_some(())
        },
    )
    .await;
    // Bring the replica's rows into the master database as text, cast each column back to
    // its type there, and compare every column with IS NOT DISTINCT FROM (types without an
    // equality operator by their text output).
    let select: Vec<String> = (0..FAMILIES.len()).map(|i| format!("c{i}::text")).collect();
    let copied = r
        .query(&format!("SELECT id, {} FROM wide", select.join(", ")), &[])
        .await
        .unwrap();
    mm.batch_execute("CREATE TEMP TABLE replica_rows (LIKE wide)")
        .await
        .unwrap();
    let placeholders: Vec<String> = (1..=FAMILIES.len() + 1).map(|i| format!("${i}")).collect();
    let insert = format!(
        "INSERT INTO replica_rows VALUES ({})",
        placeholders.join(", ")
    );
    for row in &copied {
        let id: i32 = row.get(0);
        // Text-format parameters of each column's type: the server parses them as input.
        let mut params = vec![TextParam(Some(id.to_string()))];
        params.extend((1..row.len()).map(|i| TextParam(row.get(i))));
        mm.execute_raw(&insert, params).await.unwrap();
    }
    for (i, (ty, has_equality, _)) in FAMILIES.iter().enumerate() {
        let predicate = if *has_equality {
            format!("w.c{i} IS DISTINCT FROM x.c{i} OR w.c{i}::text IS DISTINCT FROM x.c{i}::text")
        } else {
            format!("w.c{i}::text IS DISTINCT FROM x.c{i}::text")
        };
        let differing: i64 = mm
            .query_one(
                &format!(
                    "SELECT count(*) FROM wide w FULL JOIN replica_rows x USING (id)
                      WHERE w.id IS NULL OR x.id IS NULL OR {predicate}"
                ),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(differing, 0, "column c{i} ({ty}) differs on the replica");
    }
    assert_eq!(copied.len() as i64, expected);
    assert!(
        applier
            .metric("pgferry_apply_copy_batches_total", "outcome=\"written\"")
            .unwrap_or(0.0)
            >= 1.0,
        "snapshot rows went to the replica with COPY"
    );
}
