#![no_main]
// Fuzzes the `manifest_digest` decoder of slmesh_protocol::decoders::ALL: it must never panic.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (_, decode) = slmesh_protocol::decoders::ALL
        .iter()
        .find(|(name, _)| *name == "manifest_digest")
        .expect("decoder is listed");
    let _ = decode(data);
});
