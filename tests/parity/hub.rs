//! Hub ids resolve through the hf-hub cache without any network access when the files are cached
//! (HF_HUB_OFFLINE=1 makes sure nothing is downloaded). This sets HF_HOME and HF_HUB_OFFLINE for the
//! whole test process: no other test of the parity binary loads a hub id, and std orders its
//! environment reads and writes.

use crate::common::*;
use candle_core::{DType, Device};
use matvlm::model::vlm::Vlm;

#[test]
fn a_cached_hub_checkpoint_loads_offline() {
    let home = tempfile::tempdir().unwrap();
    let repo = home
        .path()
        .join("hub")
        .join("models--tiny-org--tiny-tinyllava");
    let snapshot = repo.join("snapshots").join("0123456789abcdef");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), "0123456789abcdef").unwrap();
    for entry in std::fs::read_dir(fixture("teacher")).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, snapshot.join(p.file_name().unwrap())).unwrap();
    }
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");

    let vlm = Vlm::load("tiny-org/tiny-tinyllava", DType::F32, &Device::Cpu).unwrap();
    let r = reference("teacher", "reference.safetensors");
    let (logits, _) = vlm
        .forward(&[ids_i64(&r["text_prompt_ids"])], None, &Default::default())
        .unwrap();
    assert!(max_abs_diff(&logits.squeeze(0).unwrap(), &r["text_logits"]) <= 1e-4);

    let err = Vlm::load("tiny-org/not-cached", DType::F32, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("HF_HUB_OFFLINE"), "{err}");
    let err = Vlm::load("./no/such/folder", DType::F32, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("neither a local folder"), "{err}");
}
