//! Parse + map per document: the work flowthrough does on the hot path before the store.
//! Target (issue 6): ≥ 250k documents/s per core for a one-command UserAdd.

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use flowthrough::config::Config;
use flowthrough::mapping::{self, MapContext};
use flowthrough::oci::{self, ParseLimits, ResponseCommand};

fn sample(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("schemas/samples")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn bench(c: &mut Criterion) {
    let config = Config::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/flowthrough.example.toml"),
    )
    .expect("the example config loads");
    let languages = config.language_table();
    let template = &config.templates["acme"];
    let limits = ParseLimits::default();
    let mut group = c.benchmark_group("translate");
    group.throughput(Throughput::Elements(1));
    for name in [
        "user-add-17sp4.xml",
        "user-add-22v2.xml",
        "user-modify-22.xml",
    ] {
        let doc = sample(name);
        group.bench_function(format!("parse+map {name}"), |b| {
            b.iter(|| {
                let document = oci::parse(black_box(&doc), &limits).expect("sample parses");
                let mut responses = Vec::with_capacity(document.commands.len());
                for request in &document.commands {
                    let ctx = MapContext {
                        template_name: "acme",
                        template,
                        languages: &languages,
                        last_profile: None,
                    };
                    let plan = mapping::plan(&request.command, &ctx);
                    black_box(plan.webex_call());
                    responses.push(ResponseCommand::Success {
                        echo: request.echo.clone(),
                    });
                }
                black_box(oci::write(&document.session, &responses))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
