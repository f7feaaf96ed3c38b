//! Every module shipped in `examples/modules/` loads and instantiates on the default engine,
//! and on a default pool unless it is meant not to fit.

use berth_engine::{Config, Engine, Instance, InstanceAllocationStrategy, PoolingConfig};

fn shipped() -> Vec<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/modules");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 5, "the shipped modules are there");
    files
}

#[test]
fn shipped_modules_instantiate() {
    let on_demand = Engine::new(&Config::new()).unwrap();
    let mut config = Config::new();
    let mut pool = PoolingConfig::new();
    pool.total_memories(4).total_tables(4);
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    let pooling = Engine::new(&config).unwrap();
    for path in shipped() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let module = on_demand.load(berth_wasm::parse_file(&path).unwrap()).unwrap();
        let instance = Instance::new(&module).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        drop(instance);
        let in_pool = pooling.load(berth_wasm::parse_file(&path).unwrap());
        match name.as_str() {
            "multi.wat" | "memory64.wat" => assert!(in_pool.is_err(), "{name} has more than one memory"),
            _ => drop(Instance::new(&in_pool.unwrap()).unwrap_or_else(|e| panic!("{name} in a pool: {e:#}"))),
        }
    }
}

#[test]
fn hello_reads_its_data_and_elements() {
    let engine = Engine::new(&Config::new()).unwrap();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/modules/hello.wat");
    let module = engine.load(berth_wasm::parse_file(path).unwrap()).unwrap();
    let instance = Instance::builder(&module)
        .func_resolver(|f| 100 + f.as_u32() as usize)
        .instantiate()
        .unwrap();
    let mut text = [0u8; 16];
    instance.memory_read(0, 0, &mut text).unwrap();
    assert_eq!(&text, b"hello from berth");
    assert_eq!(
        (
            instance.table_get(0, 1).unwrap(),
            instance.table_get(0, 2).unwrap()
        ),
        (100, 101)
    );
    assert_eq!(&instance.global(1).unwrap().storage[..8], &42i64.to_le_bytes());
}
