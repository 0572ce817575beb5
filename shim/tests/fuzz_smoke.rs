//! The shim's fuzz targets (`cocoon_shim::fuzz`: what the guest sends the host) on
//! stable, seeded with valid examples to mutate. `make fuzz` runs a million each.

use cocoon_shim::fuzz::TARGETS;
use protobuf::Message;

#[test]
fn fuzz_targets_survive_random_inputs() {
    let mut stats = cocoon_protocol::agent::StatsContainerResponse::new();
    let mut mem = cocoon_protocol::agent::MemoryStats::new();
    mem.usage_bytes = 1 << 20;
    mem.limit_bytes = 1 << 30;
    stats.memory = protobuf::MessageField::some(mem);
    let mut stats_bytes = vec![0u8];
    stats_bytes.extend(stats.write_to_bytes().unwrap());
    let mut oom = cocoon_protocol::agent::OomEvent::new();
    oom.container_id = "c1".into();
    let mut oom_bytes = vec![1u8];
    oom_bytes.extend(oom.write_to_bytes().unwrap());
    let config = include_bytes!("../../docs/config.toml");
    let seeds: &[&[u8]] = &[&stats_bytes, &oom_bytes, b"OK 1073741824", config];
    let iters = cocoon_nested::fuzzing::iterations();
    for (name, target) in TARGETS {
        cocoon_nested::fuzzing::run(name, *target, seeds, iters);
    }
}
