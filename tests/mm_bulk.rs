//! Multi-master bounded locks (issue 10): a 200,000-row source transaction applies. Its own
//! test binary, because the long apply transaction holds back slot creation (which waits for
//! running transactions) on its clusters, and the other multi-master tests create slots.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::broker::Broker;
use common::mesh::{mesh, KV_DDL};
use common::pg::PgCluster;
use common::wait_for;

fn broker() -> &'static Broker {
    static BROKER: OnceLock<Broker> = OnceLock::new();
    BROKER.get_or_init(Broker::start)
}

/// One source transaction of 200,000 rows applies in multi-master: no per-key lock-table
/// entries (the old advisory locks ran out of shared memory and retried forever).
#[tokio::test(flavor = "multi_thread")]
async fn a_200k_row_transaction_applies() {
    let nodes = mesh(
        "mmbulk",
        &[PgCluster::shared_of_three(0), PgCluster::shared_of_three(1)],
        KV_DDL,
        "",
        &broker().address(),
    )
    .await;
    let (a, b) = (nodes[0].client().await, nodes[1].client().await);
    a.batch_execute("INSERT INTO kv SELECT g, g % 97, NULL FROM generate_series(1, 200000) g")
        .await
        .unwrap();
    let state = "SELECT count(*) || ':' || sum(v) FROM kv";
    let want: Option<String> = a.query_one(state, &[]).await.unwrap().get(0);
    assert!(want.as_deref().is_some_and(|w| w.starts_with("200000:")));
    wait_for("200k rows on B", Duration::from_secs(900), || async {
        let got: Option<String> = b.query_one(state, &[]).await.ok()?.get(0);
        (got == want).then_some(())
    })
    .await;
}
