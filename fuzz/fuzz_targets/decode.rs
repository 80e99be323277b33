//! The whole receive path of the aggregator on hostile bytes: frame header,
//! bounded zstd, record decoding (batches, gaps, acks). Must never panic,
//! never allocate past the limits, and whatever decodes must re-encode to
//! bytes that decode to the same thing.
//!
//! Inputs starting with an even byte are used as they are (a frame); with an
//! odd byte, the rest is a raw batch payload that is compressed and framed
//! here first, so the record decoder is reached without guessing zstd.
#![no_main]
use libfuzzer_sys::fuzz_target;
use protocol::*;

fn limits() -> Limits {
    Limits {
        max_frame: 1 << 20,
        max_decompressed: 4 << 20,
        ..Limits::default()
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let framed;
    let input: &[u8] = if first & 1 == 0 {
        rest
    } else {
        let z = zstd::bulk::compress(rest, 1).unwrap();
        let mut f = Vec::new();
        encode_frame(FrameKind::Batch, &z, &mut f);
        framed = f;
        &framed
    };
    let l = limits();
    if let Ok(b) = decode_batch(input, &l) {
        let mut scratch = Vec::new();
        let once = encode_batch(&b, 1, &mut scratch);
        let again = decode_batch(&once, &Limits::default()).expect("re-encoded batch decodes");
        let twice = encode_batch(&again, 1, &mut scratch);
        assert_eq!(once, twice, "encode/decode is not stable");
    }
    if let Ok(g) = decode_gap(input, &l) {
        assert_eq!(decode_gap(&encode_gap(&g), &l).unwrap(), g);
    }
    let _ = decode_ack(input);
    let _ = decode_frame_header(input, &l);
});
