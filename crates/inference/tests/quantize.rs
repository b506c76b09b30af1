//! Re-quantising the demo model (Q4_1) to the types this engine runs fast: the result is a
//! GGUF that mistral.rs loads and that answers the same question as the original.
//! Damaged input gets an error, never a half-written output.

use mistralrs::{RequestBuilder, TextMessageRole, TextMessages};
use slmesh_e2e::demo_model;
use slmesh_inference::quantize::{quantize_gguf, QuantType, QuantizeError};
use slmesh_inference::{check_gguf, LoadedModel, ModelSpec};

const QUESTION: &str = "What is the capital of France? Answer in one word.";

async fn answer(gguf: std::path::PathBuf) -> String {
    let model = LoadedModel::load(ModelSpec { name: "smollm2".into(), version: 1, gguf }).await.expect("load");
    let request = RequestBuilder::from(TextMessages::new().add_message(TextMessageRole::User, QUESTION))
        .set_deterministic_sampler()
        .set_sampler_max_len(8);
    let response = model.chat(request).await.expect("chat");
    response.choices[0].message.content.clone().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_q4_0_variant_of_the_demo_model_loads_and_answers_like_the_original() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("smollm2.Q4_0.gguf");
    let report = quantize_gguf(&demo_model(), &out, QuantType::Q4_0).expect("quantize");
    let info = check_gguf(&out).expect("a valid GGUF");
    assert_eq!(info.quantization, "Q4_0");
    assert!(report.by_type.get("Q4_0").copied().unwrap_or(0) > 100, "{report:?}");
    assert!(!report.by_type.contains_key("Q4_1"), "nothing left in Q4_1: {report:?}");
    assert!(report.bytes_out < report.bytes_in, "Q4_0 is smaller than Q4_1: {report:?}");

    let original = answer(demo_model()).await;
    let variant = answer(out.clone()).await;
    assert!(original.contains("Paris"), "the original says {original:?}");
    assert!(variant.contains("Paris"), "the Q4_0 variant says {variant:?}");

    // Same input, same bytes: a variant can be made again and checked against a manifest.
    let again = dir.path().join("again.gguf");
    quantize_gguf(&demo_model(), &again, QuantType::Q4_0).expect("quantize again");
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&again).unwrap());
}

#[test]
fn damaged_input_or_an_existing_output_is_an_error_and_leaves_no_file() {
    let dir = tempfile::tempdir().expect("tmp");
    let bytes = std::fs::read(demo_model()).expect("demo model");
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let out = dir.path().join("out.gguf");
    let err = quantize_gguf(&truncated, &out, QuantType::Q8_0).unwrap_err();
    assert!(matches!(err, QuantizeError::Input(_)), "{err}");
    let garbage = dir.path().join("garbage.gguf");
    std::fs::write(&garbage, b"GGUF\x03\x00\x00\x00not really").unwrap();
    assert!(quantize_gguf(&garbage, &out, QuantType::Q8_0).is_err());
    assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| {
        let name = e.unwrap().file_name();
        name == "truncated.gguf" || name == "garbage.gguf"
    }));
    std::fs::write(&out, b"keep me").unwrap();
    let err = quantize_gguf(&demo_model(), &out, QuantType::Q4_0).unwrap_err();
    assert!(err.to_string().contains("exists already"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
}
