use proptest::prelude::*;
use protocol::*;

fn sample_batch(seq: u64, snaps: usize) -> Batch {
    let snap = |i: usize| Snapshot {
        ts_ms: 1_700_000_000_000 + i as u64 * 1000,
        interval_ms: 1000,
        cpu: (0..3)
            .map(|c| CpuRec {
                cpu: if c == 0 { CPU_TOTAL } else { c - 1 },
                user: 12.5,
                idle: 80.0,
                system: 7.5,
                ..Default::default()
            })
            .collect(),
        system: SystemRec {
            load1: 0.5,
            procs_running: 2,
            ..Default::default()
        },
        memory: MemoryRec {
            total: 24 << 30,
            available: 20 << 30,
            ..Default::default()
        },
        pressure: vec![PressureRec {
            resource: 1,
            some_avg10: 0.1,
            ..Default::default()
        }],
        disks: vec![DiskRec {
            device: "vda".into(),
            reads_per_s: 3.0,
            in_flight: 1,
            ..Default::default()
        }],
        filesystems: vec![FsRec {
            mount: "/".into(),
            device: "/dev/vda".into(),
            fstype: "ext4".into(),
            size_bytes: 1 << 40,
            ..Default::default()
        }],
        nets: vec![NetRec {
            interface: "eth0".into(),
            rx_bytes_per_s: 1234.0,
            ..Default::default()
        }],
        tcp: TcpRec {
            curr_estab: 5,
            retrans_segs_per_s: 0.2,
            ..Default::default()
        },
        probes: Some(ProbeRec {
            execs_per_s: 4.0,
            oom_kills: 1,
            ..Default::default()
        }),
        latency: vec![LatencyRec {
            source: "runqueue".into(),
            unit: "us".into(),
            count: 12,
            sum: 340,
            buckets: vec![
                BucketRec {
                    index: 3,
                    count: 10,
                },
                BucketRec { index: 7, count: 2 },
            ],
        }],
        tcp_ports: vec![PortRec {
            port: 443,
            retransmits: 3,
        }],
        events: vec![EventRec {
            kind: "oom_kill".into(),
            ts_ms: 1_700_000_000_500,
            pid: 4242,
            comm: "tail".into(),
            cgroup: "/x".into(),
            detail: "anon_rss_kb=1".into(),
        }],
        // Labels travel with the first snapshot of a batch only.
        host_labels: if i == 0 {
            vec![HostLabelRec {
                name: "env".into(),
                value: "prod".into(),
            }]
        } else {
            Vec::new()
        },
        cgroups: vec![CgroupRec {
            cgroup: "/system.slice/nginx.service".into(),
            container: "nginx.service".into(),
            cpu_pct: 42.5,
            cpu_limit: 0.5,
            cpu_periods: 10,
            cpu_throttled_periods: 3,
            memory_usage: 100 << 20,
            memory_limit: 200 << 20,
            ..Default::default()
        }],
        cgroup_io: vec![CgroupIoRec {
            cgroup: "/system.slice/nginx.service".into(),
            device: "vda".into(),
            read_bytes_per_s: 4096.0,
            ..Default::default()
        }],
        processes: vec![
            ProcessRec {
                pid: 4242,
                comm: "nginx".into(),
                user: "www-data".into(),
                cgroup: "/system.slice/nginx.service".into(),
                cmdline: "nginx: worker process".into(),
                cpu_pct: 40.0,
                rss: 30 << 20,
                threads: 1,
                processes: 1,
                ..Default::default()
            },
            ProcessRec {
                comm: "other".into(),
                cpu_pct: 3.0,
                processes: 120,
                ..Default::default()
            },
        ],
        cgroup_latency: vec![CgroupLatencyRec {
            cgroup: "/docker/0123456789abcdef".into(),
            container: "docker:0123456789ab".into(),
            source: "runqueue".into(),
            unit: "us".into(),
            count: 7,
            sum: 900,
            buckets: vec![BucketRec { index: 7, count: 7 }],
            ..Default::default()
        }],
    };
    Batch {
        host: "web-1".into(),
        boot_id: "b7a3".into(),
        seq,
        info: Some(HostInfo {
            hostname: "web-1".into(),
            cpus: 2,
            ..Default::default()
        }),
        snapshots: (0..snaps).map(snap).collect(),
    }
}

#[test]
fn round_trip() {
    let b = sample_batch(7, 5);
    let frame = encode_batch(&b, 3, &mut Vec::new());
    assert_eq!(decode_batch(&frame, &Limits::default()).unwrap(), b);
}

#[test]
fn every_truncation_is_a_typed_error() {
    let frame = encode_batch(&sample_batch(1, 3), 3, &mut Vec::new());
    for n in 0..frame.len() {
        let err = decode_batch(&frame[..n], &Limits::default()).unwrap_err();
        assert!(
            matches!(err, Error::Truncated { .. } | Error::Zstd(_)),
            "prefix {n}: {err:?}"
        );
    }
}

#[test]
fn truncated_records_inside_valid_zstd() {
    let b = sample_batch(1, 2);
    let mut raw = Vec::new();
    b.encode(&mut raw);
    for n in 0..raw.len() {
        let z = zstd::bulk::compress(&raw[..n], 1).unwrap();
        let mut f = Vec::new();
        encode_frame(FrameKind::Batch, &z, &mut f);
        assert!(
            decode_batch(&f, &Limits::default()).is_err(),
            "prefix {n} decoded"
        );
    }
}

#[test]
fn header_errors() {
    let mut f = encode_batch(&sample_batch(1, 1), 3, &mut Vec::new());
    let l = Limits::default();
    let mut bad = f.clone();
    bad[0] = b'X';
    assert!(matches!(decode_batch(&bad, &l), Err(Error::BadMagic(_))));
    let mut bad = f.clone();
    bad[4] = 9;
    assert_eq!(decode_batch(&bad, &l), Err(Error::UnsupportedVersion(9)));
    let mut bad = f.clone();
    bad[5] = 77;
    assert_eq!(decode_batch(&bad, &l), Err(Error::UnknownKind(77)));
    f.push(0);
    assert_eq!(decode_batch(&f, &l), Err(Error::TrailingFrameBytes(1)));
    let ack = encode_ack(5);
    assert!(matches!(
        decode_batch(&ack, &l),
        Err(Error::UnexpectedKind { .. })
    ));
}

#[test]
fn frame_size_limit_just_over() {
    let f = encode_batch(&sample_batch(1, 4), 3, &mut Vec::new());
    let payload = f.len() - FRAME_HEADER_LEN;
    let at = Limits {
        max_frame: payload,
        ..Limits::default()
    };
    assert!(decode_batch(&f, &at).is_ok());
    let under = Limits {
        max_frame: payload - 1,
        ..Limits::default()
    };
    assert_eq!(
        decode_batch(&f, &under),
        Err(Error::FrameTooLarge {
            len: payload,
            max: payload - 1
        })
    );
}

#[test]
fn decompressed_limit_just_over_and_zip_bomb() {
    let b = sample_batch(1, 4);
    let f = encode_batch(&b, 3, &mut Vec::new());
    let raw = decompress_bounded(&f[FRAME_HEADER_LEN..], 1 << 24).unwrap();
    let at = Limits {
        max_decompressed: raw.len(),
        ..Limits::default()
    };
    assert!(decode_batch(&f, &at).is_ok());
    let under = Limits {
        max_decompressed: raw.len() - 1,
        ..Limits::default()
    };
    assert_eq!(
        decode_batch(&f, &under),
        Err(Error::DecompressedTooLarge { max: raw.len() - 1 })
    );

    // 1 GiB of zeros compresses to ~40 KB; it must be refused without inflating it.
    let bomb = zstd::bulk::compress(&vec![0u8; 256 << 20], 19).unwrap();
    let mut fb = Vec::new();
    encode_frame(FrameKind::Batch, &bomb, &mut fb);
    assert!(matches!(
        decode_batch(&fb, &Limits::default()),
        Err(Error::DecompressedTooLarge { .. })
    ));
}

fn frame_of(raw: &[u8]) -> Vec<u8> {
    let z = zstd::bulk::compress(raw, 1).unwrap();
    let mut f = Vec::new();
    encode_frame(FrameKind::Batch, &z, &mut f);
    f
}

/// A version-2 batch frame around a raw payload.
fn frame_v2_of(raw: &[u8]) -> Vec<u8> {
    let mut f = frame_of(raw);
    f[4] = 2;
    f
}

#[test]
fn snapshot_count_limit_just_over() {
    let b = sample_batch(1, 3);
    let f = encode_batch(&b, 1, &mut Vec::new());
    let at = Limits {
        max_snapshots: 3,
        ..Limits::default()
    };
    assert!(decode_batch(&f, &at).is_ok());
    let under = Limits {
        max_snapshots: 2,
        ..Limits::default()
    };
    assert_eq!(
        decode_batch(&f, &under),
        Err(Error::CountTooLarge {
            what: "batch.snapshots",
            count: 3,
            max: 2
        })
    );
}

#[test]
fn item_count_limit_just_over() {
    let b = sample_batch(1, 1); // 3 cpu entries
    let f = encode_batch(&b, 1, &mut Vec::new());
    assert!(decode_batch(
        &f,
        &Limits {
            max_items: 3,
            ..Limits::default()
        }
    )
    .is_ok());
    assert!(matches!(
        decode_batch(
            &f,
            &Limits {
                max_items: 2,
                ..Limits::default()
            }
        ),
        Err(Error::CountTooLarge {
            count: 3,
            max: 2,
            ..
        })
    ));
}

#[test]
fn huge_declared_count_is_refused_before_allocation() {
    // host "", boot "", seq 1, no info, then a count of 2^40 snapshots.
    let mut raw = vec![0u8, 0, 1, 0];
    protocol_put_varint(&mut raw, 1 << 40);
    let f = frame_of(&raw);
    assert!(matches!(
        decode_batch(&f, &Limits::default()),
        Err(Error::CountTooLarge { .. })
    ));
    // Under the count limit but more than the bytes present: Truncated, not an allocation.
    let mut raw = vec![0u8, 0, 1, 0];
    protocol_put_varint(&mut raw, 4000);
    let f = frame_of(&raw);
    assert!(matches!(
        decode_batch(&f, &Limits::default()),
        Err(Error::Truncated { .. })
    ));
}

fn protocol_put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[test]
fn string_limit_just_over() {
    let mut b = sample_batch(1, 1);
    b.host = "h".repeat(100);
    let f = encode_batch(&b, 1, &mut Vec::new());
    assert!(decode_batch(
        &f,
        &Limits {
            max_string: 100,
            ..Limits::default()
        }
    )
    .is_ok());
    assert_eq!(
        decode_batch(
            &f,
            &Limits {
                max_string: 99,
                ..Limits::default()
            }
        ),
        Err(Error::StringTooLong {
            what: "batch.host",
            len: 100,
            max: 99
        })
    );
}

#[test]
fn bad_utf8_and_zero_seq_and_trailing() {
    let raw = vec![1u8, 0xff, 0, 1, 0, 0];
    assert!(matches!(
        decode_batch(&frame_of(&raw), &Limits::default()),
        Err(Error::BadUtf8 { .. })
    ));
    let raw = vec![0u8, 0, 0, 0, 0];
    assert!(matches!(
        decode_batch(&frame_of(&raw), &Limits::default()),
        Err(Error::InvalidValue {
            what: "batch.seq",
            ..
        })
    ));
    let raw = vec![0u8, 0, 1, 0, 0, 42];
    assert_eq!(
        decode_batch(&frame_v2_of(&raw), &Limits::default()),
        Err(Error::TrailingBytes(1))
    );
    // Version 3: a byte after the header is the length of the times block, which is not there.
    assert_eq!(
        decode_batch(&frame_of(&raw), &Limits::default()),
        Err(Error::Truncated {
            offset: 6,
            needed: 42
        })
    );
    let raw = vec![
        0u8, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
    ];
    assert!(matches!(
        decode_batch(&frame_of(&raw), &Limits::default()),
        Err(Error::VarintOverflow(_))
    ));
}

#[test]
fn ack_and_error_frames() {
    assert_eq!(decode_ack(&encode_ack(42)).unwrap(), Ok(42));
    assert_eq!(
        decode_ack(&encode_error(9, "clickhouse down")).unwrap(),
        Err((9, "clickhouse down".to_string()))
    );
    assert!(decode_ack(b"SOND").is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn prop_round_trip(seq in 1u64.., n in 0usize..6, host in "[a-z0-9.-]{0,40}", v in any::<f32>().prop_filter("not nan", |f| !f.is_nan()), big in any::<u64>()) {
        let mut b = sample_batch(seq, n);
        b.host = host;
        for s in &mut b.snapshots { s.memory.total = big; s.cpu[0].user = v; }
        let f = encode_batch(&b, 1, &mut Vec::new());
        prop_assert_eq!(decode_batch(&f, &Limits::default()).unwrap(), b);
    }

    #[test]
    fn prop_corruption_never_panics(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let mut f = encode_batch(&sample_batch(3, 2), 1, &mut Vec::new());
        for (i, x) in flips { let n = f.len(); f[i % n] ^= x | 1; }
        let _ = decode_batch(&f, &Limits::default());
    }

    #[test]
    fn prop_corrupt_records_never_panic(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let mut raw = Vec::new();
        sample_batch(3, 2).encode(&mut raw);
        for (i, x) in flips { let n = raw.len(); raw[i % n] ^= x | 1; }
        let _ = decode_batch(&frame_of(&raw), &Limits::default());
    }

    #[test]
    fn prop_random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_batch(&bytes, &Limits::default());
        let _ = decode_batch(&frame_of(&bytes), &Limits::default());
        let _ = decode_ack(&bytes);
    }
}

/// The fuzzer's seed corpus (fuzz/corpus/decode): valid frames of every kind,
/// prefixed with the fuzz target's mode byte. `SONDE_WRITE_CORPUS=1 cargo test -p
/// sonde-protocol seed_corpus` rewrites it; otherwise this checks the committed
/// seeds still decode, so a format change cannot leave the fuzzer on stale inputs.
#[test]
fn seed_corpus() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/decode");
    let mut seeds: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut scratch = Vec::new();
    for (name, b) in [
        ("batch-1", sample_batch(1, 1)),
        ("batch-5", sample_batch(7, 5)),
        ("batch-v2", sample_batch(3, 3)),
        ("batch-info", {
            let mut b = sample_batch(2, 2);
            b.info = Some(HostInfo {
                hostname: "h".into(),
                kernel: "6.18".into(),
                cpus: 2,
                probes: "runqueue,block".into(),
                ..Default::default()
            });
            b
        }),
    ] {
        let mut f = vec![0u8];
        if name == "batch-v2" {
            // A version-2 frame: the row decoder stays covered.
            f.extend(encode_batch_version(&b, 2, 3));
            seeds.push((name, f));
            continue;
        }
        f.extend(encode_batch(&b, 3, &mut scratch));
        seeds.push((name, f));
        // Raw payload (the fuzz target compresses it): reaches the record decoder.
        let frame = encode_batch(&b, 3, &mut scratch);
        let raw = decompress_bounded(&frame[FRAME_HEADER_LEN..], 1 << 24).unwrap();
        let mut r = vec![1u8];
        r.extend(raw);
        seeds.push((
            if name == "batch-1" {
                "raw-1"
            } else if name == "batch-5" {
                "raw-5"
            } else {
                "raw-info"
            },
            r,
        ));
    }
    let mut g = vec![0u8];
    g.extend(encode_gap(&Gap {
        host: "h".into(),
        boot_id: "b".into(),
        first_seq: 3,
        last_seq: 9,
        from_ms: 1_700_000_000_000,
        to_ms: 1_700_000_035_000,
        batches: 7,
        samples: 700,
    }));
    seeds.push(("gap", g));
    let mut a = vec![0u8];
    a.extend(encode_ack(42));
    seeds.push(("ack", a));
    let mut e = vec![0u8];
    e.extend(encode_error(42, "not stored"));
    seeds.push(("error", e));
    if std::env::var_os("SONDE_WRITE_CORPUS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
        }
    }
    for (name, _) in &seeds {
        let p = dir.join(format!("seed-{name}"));
        let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let (mode, rest) = data.split_first().unwrap();
        let ok = if *mode & 1 == 1 {
            let mut f = Vec::new();
            encode_frame(
                FrameKind::Batch,
                &zstd::bulk::compress(rest, 1).unwrap(),
                &mut f,
            );
            decode_batch(&f, &Limits::default()).is_ok()
        } else {
            decode_batch(rest, &Limits::default()).is_ok()
                || decode_gap(rest, &Limits::default()).is_ok()
                || decode_ack(rest).is_ok()
        };
        assert!(ok, "seed {} no longer decodes", p.display());
    }
}

/// A batch frame written by the version-1 encoder (before records were length-delimited)
/// must still decode to the same batch: sensors and spools of the previous release send it.
/// `SONDE_WRITE_V1_FIXTURE=1` rewrote the file with the version-1 build (commit before the
/// declaration-driven tables); it must not be rewritten by a later build.
#[test]
fn version_1_frames_still_decode() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/batch-v1.bin");
    let b = sample_batch(9, 3);
    if std::env::var_os("SONDE_WRITE_V1_FIXTURE").is_some() {
        std::fs::write(path, encode_batch(&b, 3, &mut Vec::new())).unwrap();
    }
    let frame = std::fs::read(path).unwrap();
    assert_eq!(frame[4], 1, "the fixture is a version-1 frame");
    // Version 1 had no host labels, cgroups or processes (added later, inside the
    // delimited snapshot).
    let mut want = b;
    for s in &mut want.snapshots {
        s.host_labels.clear();
        s.cgroups.clear();
        s.cgroup_io.clear();
        s.processes.clear();
        s.cgroup_latency.clear();
    }
    assert_eq!(decode_batch(&frame, &Limits::default()).unwrap(), want);
}

/// The previous release's frame (version 2, written by the protocol crate of commit c1051dc
/// for `sample_batch(9, 3)`, before `cgroup_latency` existed) still decodes, and what this
/// build sends an aggregator of that release (its version-2 encoder, or a version-3 frame
/// rewritten) decodes to the same batch.
#[test]
fn version_2_frames_of_the_previous_release_decode_and_match_the_v2_encoder() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/batch-v2.bin");
    let frame = std::fs::read(path).unwrap();
    assert_eq!(frame[4], 2, "the fixture is a version-2 frame");
    let mut want = sample_batch(9, 3);
    for s in &mut want.snapshots {
        s.cgroup_latency.clear();
    }
    assert_eq!(decode_batch(&frame, &Limits::default()).unwrap(), want);
    // A batch with no rows of the newer table decodes the same from both encoders.
    let ours = encode_batch_version(&want, 2, 3);
    assert_eq!(decode_batch(&ours, &Limits::default()).unwrap(), want);
    let v3 = encode_batch(&want, 3, &mut Vec::new());
    assert_eq!(
        decode_batch(
            &downgrade_batch_frame_to(&v3, 2, &Limits::default()).unwrap(),
            &Limits::default()
        )
        .unwrap(),
        want
    );
}

/// What a sensor sends an aggregator of the previous release: the v1 encoder produces
/// exactly the bytes the v1 release wrote (the committed fixture), and a v2 frame
/// downgrades to it.
#[test]
fn version_1_encoder_matches_the_v1_release() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/batch-v1.bin");
    let fixture = std::fs::read(path).unwrap();
    let b = sample_batch(9, 3);
    assert_eq!(encode_batch_v1(&b, 3), fixture);
    let v2 = encode_batch(&b, 3, &mut Vec::new());
    assert_eq!(v2[4], VERSION);
    assert_eq!(
        downgrade_batch_frame(&v2, &Limits::default()).unwrap(),
        fixture
    );
    assert_eq!(
        downgrade_batch_frame(&fixture, &Limits::default()).unwrap(),
        fixture
    );
}

// ---- wire version 3 (columnar) ------------------------------------------------------------

fn varint_at(b: &[u8], pos: &mut usize) -> u64 {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let x = b[*pos];
        *pos += 1;
        v |= ((x & 0x7f) as u64) << shift;
        if x & 0x80 == 0 {
            break;
        }
    }
    v
}

/// A version-3 payload (batch without `info`) cut into its head and its blocks: times,
/// then one block per table; each block as (start of its length prefix, end).
fn v3_blocks(raw: &[u8]) -> (usize, Vec<(usize, usize)>) {
    let mut pos = 0;
    for _ in 0..2 {
        let n = varint_at(raw, &mut pos) as usize;
        pos += n;
    }
    varint_at(raw, &mut pos); // seq
    assert_eq!(raw[pos], 0, "the test batch has no info");
    pos += 1;
    varint_at(raw, &mut pos); // snapshot count
    let head = pos;
    let mut blocks = Vec::new();
    while pos < raw.len() {
        let start = pos;
        let n = varint_at(raw, &mut pos) as usize;
        pos += n;
        blocks.push((start, pos));
    }
    (head, blocks)
}

fn put_varint_vec(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn v3_raw(b: &Batch) -> Vec<u8> {
    let f = encode_batch(b, 3, &mut Vec::new());
    assert_eq!(f[4], 3, "this build writes version 3");
    decompress_bounded(&f[FRAME_HEADER_LEN..], 1 << 24).unwrap()
}

#[test]
fn version_3_reader_skips_tables_it_does_not_know_and_defaults_tables_not_sent() {
    let mut b = sample_batch(5, 4);
    b.info = None;
    let raw = v3_raw(&b);
    let (_, blocks) = v3_blocks(&raw);
    assert_eq!(
        blocks.len(),
        1 + TABLES.len(),
        "times + one block per table"
    );
    // A newer sender's extra table at the end: skipped.
    let mut newer = raw.clone();
    newer.extend([3, 9, 9, 9]);
    assert_eq!(
        decode_batch(&frame_of(&newer), &Limits::default()).unwrap(),
        b
    );
    // An older sender without the last table: it decodes empty.
    let (start, _) = *blocks.last().unwrap();
    let older = raw[..start].to_vec();
    let mut want = b.clone();
    for s in &mut want.snapshots {
        s.cgroup_latency.clear();
    }
    assert_eq!(
        decode_batch(&frame_of(&older), &Limits::default()).unwrap(),
        want
    );
}

#[test]
fn version_3_columns_not_sent_are_default_and_unknown_columns_skipped() {
    let mut b = sample_batch(5, 3);
    b.info = None;
    let raw = v3_raw(&b);
    let (_, blocks) = v3_blocks(&raw);
    // The last table (cgroup_latency): rewrite its block without its last column, and once
    // with an extra column a newer sender would have. Its last column is the histogram:
    // one bucket (7, 7) per row, 3 bytes per row, 3 rows.
    let (start, end) = *blocks.last().unwrap();
    let mut pos = start;
    let _len = varint_at(&raw, &mut pos);
    let ncols = varint_at(&raw, &mut pos) as usize;
    let types = raw[pos..pos + ncols].to_vec();
    pos += ncols;
    let rest = raw[pos..end].to_vec();
    let (mut q, mut streams) = (0usize, Vec::new());
    for _ in 0..2 {
        let s = q;
        let n = varint_at(&rest, &mut q) as usize;
        q += n;
        streams.push(rest[s..q].to_vec()); // row counts, row references
    }
    let rebuild = |ncols: usize, types: &[u8], body: &[u8]| {
        let mut b = Vec::new();
        put_varint_vec(&mut b, ncols as u64);
        b.extend(types);
        b.extend(body);
        let mut out = raw[..start].to_vec();
        put_varint_vec(&mut out, b.len() as u64);
        out.extend(b);
        out
    };
    assert_eq!(*types.last().unwrap(), 4, "the last column is a histogram");
    let fewer = rebuild(ncols - 1, &types[..ncols - 1], &rest[..rest.len() - 9]);
    let mut want = b.clone();
    for s in &mut want.snapshots {
        for r in &mut s.cgroup_latency {
            r.buckets.clear();
        }
    }
    assert_eq!(
        decode_batch(&frame_of(&fewer), &Limits::default()).unwrap(),
        want
    );
    // A newer sender's extra u32 column (three zero deltas): stepped over.
    let mut more_types = types.clone();
    more_types.push(0);
    let mut more_body = rest.clone();
    more_body.extend([0, 0, 0]);
    let more = rebuild(ncols + 1, &more_types, &more_body);
    assert_eq!(
        decode_batch(&frame_of(&more), &Limits::default()).unwrap(),
        b
    );
    // A column declared with another type than this build's: refused, not misread.
    let mut wrong = types.clone();
    wrong[0] = 2;
    assert!(decode_batch(
        &frame_of(&rebuild(ncols, &wrong, &rest)),
        &Limits::default()
    )
    .is_err());
    // Rows with no column at all are refused (each row must cost input bytes).
    let mut body = streams[0].clone();
    body.extend(&streams[1]);
    let none = rebuild(0, &[], &body);
    assert!(matches!(
        decode_batch(&frame_of(&none), &Limits::default()),
        Err(Error::InvalidValue { .. })
    ));
}

#[test]
fn version_3_downgrades_to_2_and_1_for_older_aggregators() {
    let b = sample_batch(9, 3);
    let f3 = encode_batch(&b, 3, &mut Vec::new());
    let f2 = downgrade_batch_frame_to(&f3, 2, &Limits::default()).unwrap();
    assert_eq!(f2[4], 2);
    assert_eq!(decode_batch(&f2, &Limits::default()).unwrap(), b);
    let f1 = downgrade_batch_frame(&f3, &Limits::default()).unwrap();
    assert_eq!(f1[4], 1);
    assert_eq!(f1, encode_batch_v1(&b, 3));
    // Same or older: as it is.
    assert_eq!(
        downgrade_batch_frame_to(&f2, 2, &Limits::default()).unwrap(),
        f2
    );
}

#[test]
fn version_3_rates_travel_as_integers_and_any_float_round_trips_bit_exact() {
    // Rates the way the sensor computes them (an integer increase over the interval as
    // sent) cost a few bits each; the same number of arbitrary floats costs 4 bytes each.
    let batch = |rate: &dyn Fn(usize, u32) -> f32| {
        let mut b = sample_batch(1, 5);
        for (i, s) in b.snapshots.iter_mut().enumerate() {
            s.interval_ms = [1000, 1001, 999, 1000, 1002][i];
            s.nets = (0..50)
                .map(|n| NetRec {
                    interface: format!("veth{n}"),
                    rx_bytes_per_s: rate(n * 7 + i, s.interval_ms),
                    tx_packets_per_s: rate(n + i * 3, s.interval_ms),
                    ..Default::default()
                })
                .collect();
        }
        b
    };
    let sensor_rate = |k: usize, iv: u32| ((k * 1500 + 17) as f64 / (iv as f64 / 1000.0)) as f32;
    let arbitrary = |k: usize, _iv: u32| {
        f32::from_bits(0x4400_0000 ^ (k as u32).wrapping_mul(2_654_435_761) >> 9)
    };
    let (a, b) = (batch(&sensor_rate), batch(&arbitrary));
    for x in [&a, &b] {
        let f = encode_batch(x, 3, &mut Vec::new());
        assert_eq!(&decode_batch(&f, &Limits::default()).unwrap(), x);
    }
    let raw = |x: &Batch| {
        decompress_bounded(
            &encode_batch(x, 3, &mut Vec::new())[FRAME_HEADER_LEN..],
            1 << 24,
        )
        .unwrap()
        .len()
    };
    let (ra, rb) = (raw(&a), raw(&b));
    assert!(
        ra + 2 * 500 < rb,
        "500 sensor-made rates take {ra} bytes uncompressed, 500 arbitrary floats {rb}"
    );
    // Floats no formula gives: bit for bit, NaN payloads and signed zeros included.
    let odd = [
        f32::NAN,
        f32::from_bits(0x7fc0_1234),
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MIN_POSITIVE / 3.0,
        f32::MAX,
        1e-30,
        0.1,
        -123.45,
    ];
    let mut c = sample_batch(2, odd.len());
    for (s, v) in c.snapshots.iter_mut().zip(odd) {
        s.cpu[0].user = v;
        s.pressure[0].some_avg10 = v;
    }
    let back = decode_batch(&encode_batch(&c, 3, &mut Vec::new()), &Limits::default()).unwrap();
    for (s, v) in back.snapshots.iter().zip(odd) {
        assert_eq!(s.cpu[0].user.to_bits(), v.to_bits());
        assert_eq!(s.pressure[0].some_avg10.to_bits(), v.to_bits());
    }
}
