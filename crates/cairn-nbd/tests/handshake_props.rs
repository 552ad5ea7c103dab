//! Random server handshakes (a valid greeting followed by random option replies, or plain
//! random bytes) never panic or hang the client; they end in a typed error.

use std::time::Duration;

use cairn_nbd::proto::*;
use cairn_nbd::{BASE_ALLOCATION, Client, ConnectOptions};
use proptest::prelude::*;
use tokio::io::AsyncWriteExt;

fn greeting() -> Vec<u8> {
    let mut g = NBDMAGIC.to_be_bytes().to_vec();
    g.extend_from_slice(&IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    g
}

fn opt_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut v = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn run_handshake(server_bytes: Vec<u8>) -> Result<Client, cairn_nbd::Error> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (client_side, mut server_side) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            let _ = server_side.write_all(&server_bytes).await;
            // Keep the pipe open a little so the client must rely on parsing, then close.
            tokio::time::sleep(Duration::from_millis(5)).await;
        });
        let opts = ConnectOptions::default()
            .with_context(BASE_ALLOCATION)
            .with_timeout(Duration::from_millis(300));
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            Client::connect_stream(client_side, "", opts),
        )
        .await;
        r.expect("handshake hung")
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn random_option_replies(
        replies in proptest::collection::vec(
            (prop_oneof![Just(OPT_STRUCTURED_REPLY), Just(OPT_SET_META_CONTEXT), Just(OPT_GO), any::<u32>()],
             prop_oneof![Just(REP_ACK), Just(REP_INFO), Just(REP_META_CONTEXT), Just(REP_ERR_UNSUP),
                         Just(REP_ERR_UNKNOWN), Just(REP_ERR_POLICY), any::<u32>()],
             proptest::collection::vec(any::<u8>(), 0..24)),
            0..8),
    ) {
        let mut bytes = greeting();
        for (opt, kind, data) in &replies {
            bytes.extend(opt_reply(*opt, *kind, data));
        }
        // Random replies can in principle form a valid handshake; anything else must fail.
        if let Ok(c) = run_handshake(bytes) {
            prop_assert!(c.info().meta_contexts.len() <= 8);
        }
    }

    #[test]
    fn random_bytes(data in proptest::collection::vec(any::<u8>(), 0..256), with_greeting: bool) {
        let mut bytes = if with_greeting { greeting() } else { Vec::new() };
        bytes.extend(data);
        prop_assert!(run_handshake(bytes).is_err());
    }
}

#[test]
fn valid_minimal_handshake() {
    let mut b = greeting();
    b.extend(opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    let mut ctx = 3u32.to_be_bytes().to_vec();
    ctx.extend_from_slice(BASE_ALLOCATION.as_bytes());
    b.extend(opt_reply(OPT_SET_META_CONTEXT, REP_META_CONTEXT, &ctx));
    b.extend(opt_reply(OPT_SET_META_CONTEXT, REP_ACK, &[]));
    let mut info = INFO_EXPORT.to_be_bytes().to_vec();
    info.extend_from_slice(&4096u64.to_be_bytes());
    info.extend_from_slice(&(FLAG_HAS_FLAGS | FLAG_READ_ONLY).to_be_bytes());
    b.extend(opt_reply(OPT_GO, REP_INFO, &info));
    let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [512u32, 4096, 1 << 20] {
        bs.extend_from_slice(&v.to_be_bytes());
    }
    b.extend(opt_reply(OPT_GO, REP_INFO, &bs));
    b.extend(opt_reply(OPT_GO, REP_INFO, &[0, 99, 1, 2, 3])); // unknown info: ignored
    b.extend(opt_reply(OPT_GO, REP_ACK, &[]));
    let c = run_handshake(b).unwrap();
    let i = c.info();
    assert_eq!(i.size, 4096);
    assert!(i.flags.read_only());
    assert_eq!(i.meta_contexts[0].id, 3);
    assert_eq!(i.block_size.map(|b| b.max), Some(1 << 20));
    assert_eq!(c.max_request_len(), 1 << 20);
}
