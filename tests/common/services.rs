//! The loopback services of `scripts/services.sh` and the data of
//! `scripts/push-containerdisks.sh` (nginx, registries, containerDisks), shared by the test
//! files that need them. The test script starts them and names their state directory in
//! `VDISK_SERVICES`; without it the first caller starts its own set, stopped at exit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

static SERVICES: OnceLock<HashMap<String, String>> = OnceLock::new();
static OWN_STATE: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn stop_own_services() {
    if let Some(s) = OWN_STATE.get() {
        let _ = Command::new("scripts/services.sh")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .arg("stop")
            .arg(s)
            .status();
    }
}

fn services() -> &'static HashMap<String, String> {
    SERVICES.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let state = match std::env::var_os("VDISK_SERVICES") {
            Some(s) => PathBuf::from(s),
            None => {
                let s = std::env::temp_dir().join(format!("vdisk-svc-{}", std::process::id()));
                for (script, args) in [
                    ("scripts/services.sh", vec!["start"]),
                    ("scripts/push-containerdisks.sh", vec![]),
                ] {
                    let st = Command::new(root.join(script))
                        .current_dir(root)
                        .args(args)
                        .arg(&s)
                        .status()
                        .expect("run the services scripts");
                    assert!(
                        st.success(),
                        "{script} failed: these tests need its services"
                    );
                }
                OWN_STATE.set(s.clone()).unwrap();
                // SAFETY: registering a plain extern "C" function with no captured state.
                unsafe { libc::atexit(stop_own_services) };
                s
            }
        };
        let text = std::fs::read_to_string(state.join("env"))
            .unwrap_or_else(|e| panic!("{}/env: {e} (run scripts/test.sh)", state.display()));
        text.lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
            .collect()
    })
}

/// The value of `name` in the services' env file (addresses, paths of the source disks).
pub fn var(name: &str) -> String {
    services()
        .get(name)
        .unwrap_or_else(|| panic!("services env has no {name}"))
        .clone()
}
