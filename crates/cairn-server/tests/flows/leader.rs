//! A server on a PostgreSQL catalog ([`cairn_server::leader`]): it runs jobs while it holds
//! the lease; when the database goes away it stops being active by its own deadline (it
//! cannot renew), and when the database is back it takes its lease again, recovers and
//! runs jobs again. (Two servers and a takeover: `cairn-cli`'s `tests/cli/leader.rs`.)

use std::time::{Duration, Instant};

use cairn_catalog::JobState;
use cairn_server::leader::{LEASE_TTL, MARGIN, RENEW_EVERY};
use cairn_testing::pg::PgServer;

use crate::{backup, setup_with};

#[test]
fn a_server_that_cannot_renew_its_lease_stops_being_active_until_it_holds_it_again() {
    let Some(mut pg) = PgServer::start() else {
        return;
    };
    let url = pg.fresh_database();
    let s = setup_with(|c| c.catalog = Some(url.clone()));
    assert!(
        s.server.leader.is_active(),
        "the only server takes the lease"
    );
    assert_eq!(s.run(backup(&["vm1"])).state, JobState::Succeeded);

    pg.stop();
    let t0 = Instant::now();
    while s.server.leader.is_active() {
        assert!(
            t0.elapsed() < LEASE_TTL,
            "still active without its database"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Its deadline: the last renewal it sent (at most RENEW_EVERY ago) + TTL - margin.
    assert!(
        t0.elapsed() > LEASE_TTL - MARGIN - RENEW_EVERY - Duration::from_millis(500),
        "gave up after {:?}",
        t0.elapsed()
    );

    pg.start_again();
    let t0 = Instant::now();
    while !s.server.leader.is_active() {
        assert!(
            t0.elapsed() < 3 * RENEW_EVERY,
            "not active again with its database back"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let j = s.run(backup(&["vm1"]));
    assert_eq!(j.state, JobState::Succeeded, "{:?}", j.error);
    assert_eq!(s.backups_of("vm1"), 2);
}
