//! A fixed workload for instruction counting (not timed): 2,000 admission reviews of the
//! fixture StatefulSet, response included. Run it under callgrind with
//! `bash tests/tools/callgrind-review.sh`, which prints instructions per review.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const REVIEW: &str = include_str!("../tests/fixtures/admission/create-statefulset.json");
const ITERATIONS: usize = 2_000;

fn main() {
    // The API server sends compact JSON (Go's encoding/json); the fixture is indented to be read.
    let review = serde_json::from_str::<serde_json::Value>(REVIEW)
        .and_then(|v| serde_json::to_vec(&v))
        .expect("fixture is JSON");
    let config = dkron_ha::inject::InjectorConfig::default();
    for _ in 0..ITERATIONS {
        let answer = dkron_ha::admission::review(&review, &config).expect("review");
        std::hint::black_box(answer.body);
    }
}
