//! Fills a state database with upload records for the prune benchmark (scripts/bench-prune.sh),
//! as `upload` would leave them for a store of N local media with 4 thumbnails each: the same key
//! set as scripts/bench/list_server.py and the SQL of scripts/bench-audit.sh (id = md5(i)[:24]).
//! Not a test; nothing else uses it.
//!
//! usage: cargo run --release --example bench_state -- STATE_DIR N

use synapse_s3_offload::layout::MediaPath;
use synapse_s3_offload::md5::Md5;
use synapse_s3_offload::state::{Op, Record, State};

const THUMBS: [&str; 4] = [
    "32-32-image-jpeg-crop",
    "96-96-image-jpeg-crop",
    "320-240-image-jpeg-scale",
    "640-480-image-jpeg-scale",
];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (dir, n): (&str, u64) = match args.as_slice() {
        [_, dir, n] => (dir, n.parse().expect("N is a number")),
        _ => panic!("usage: bench_state STATE_DIR N"),
    };
    let state = State::open(std::path::Path::new(dir)).expect("open the state");
    let rec = Record::new(4096, 0, [0; 16]);
    let mut ops = Vec::with_capacity(100_000);
    for i in 1..=n {
        let id = hex::encode(Md5::digest(i.to_string().as_bytes()));
        let s = format!("{}/{}/{}", &id[..2], &id[2..4], &id[4..24]);
        ops.push(Op::Record(
            MediaPath::parse(&format!("local_content/{s}")).unwrap(),
            rec,
        ));
        for t in THUMBS {
            let p = MediaPath::parse(&format!("local_thumbnails/{s}/{t}")).unwrap();
            ops.push(Op::Record(p, rec));
        }
        if ops.len() >= 100_000 {
            state.apply(&std::mem::take(&mut ops)).expect("apply");
        }
    }
    state.apply(&ops).expect("apply");
    println!("{} records", state.record_count().unwrap());
}
