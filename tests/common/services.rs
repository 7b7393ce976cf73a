//! The servers the network tests run against, shared by the test files that need them:
//! the loopback services of `scripts/services.sh` with the data of
//! `scripts/push-containerdisks.sh` (nginx, registries, squid, containerDisks), and the
//! object stores of `scripts/pyservices.sh` (moto, gcp-storage-emulator). The test script
//! starts each set and names its state directory in an environment variable
//! (`VDISK_SERVICES`, `VDISK_PYSERVICES`); without it the first caller starts its own set,
//! stopped at exit. A set that cannot start fails the tests, never skips them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// One set of servers: how to find or start it, and its `env` file once read.
struct Set {
    /// The variable naming a running set's state directory.
    var: &'static str,
    /// Scripts run (in order, with the state directory last) to start a set of our own;
    /// the first also takes `start`, and `stop` when the tests end.
    scripts: &'static [&'static str],
    /// Prefix of our own state directory in the temporary directory.
    prefix: &'static str,
    values: OnceLock<HashMap<String, String>>,
    own: OnceLock<PathBuf>,
}

static LOOPBACK: Set = Set {
    var: "VDISK_SERVICES",
    scripts: &["scripts/services.sh", "scripts/push-containerdisks.sh"],
    prefix: "vdisk-svc",
    values: OnceLock::new(),
    own: OnceLock::new(),
};

static OBJECT_STORES: Set = Set {
    var: "VDISK_PYSERVICES",
    scripts: &["scripts/pyservices.sh"],
    prefix: "vdisk-pysvc",
    values: OnceLock::new(),
    own: OnceLock::new(),
};

extern "C" fn stop_own_sets() {
    for set in [&LOOPBACK, &OBJECT_STORES] {
        if let Some(s) = set.own.get() {
            let _ = Command::new("bash")
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .arg(set.scripts[0])
                .arg("stop")
                .arg(s)
                .stdout(Stdio::null())
                .status();
            let _ = std::fs::remove_dir_all(s);
        }
    }
}

impl Set {
    fn values(&self) -> &HashMap<String, String> {
        self.values.get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR"));
            let state = match std::env::var_os(self.var).filter(|v| !v.is_empty()) {
                Some(s) => PathBuf::from(s),
                None => {
                    let s = std::env::temp_dir()
                        .join(format!("{}-{}", self.prefix, std::process::id()));
                    for (i, script) in self.scripts.iter().enumerate() {
                        let mut c = Command::new("bash");
                        c.current_dir(root).arg(script);
                        if i == 0 {
                            c.arg("start");
                        }
                        let st = c
                            .arg(&s)
                            .status()
                            .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
                        assert!(
                            st.success(),
                            "{script} failed: these tests need its servers (run it by hand to see why)"
                        );
                    }
                    self.own.set(s.clone()).unwrap();
                    static AT_EXIT: OnceLock<()> = OnceLock::new();
                    AT_EXIT.get_or_init(|| {
                        // SAFETY: registering a plain extern "C" function with no captured state.
                        unsafe { libc::atexit(stop_own_sets) };
                    });
                    s
                }
            };
            let text = std::fs::read_to_string(state.join("env")).unwrap_or_else(|e| {
                panic!(
                    "{}/env: {e} (run scripts/test.sh, or {} start DIR)",
                    state.display(),
                    self.scripts[0]
                )
            });
            text.lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
                .collect()
        })
    }

    fn get(&self, name: &str) -> String {
        self.values()
            .get(name)
            .unwrap_or_else(|| panic!("{}'s env has no {name}", self.scripts[0]))
            .clone()
    }
}

/// The value of `name` in the loopback services' env file (addresses, source disks).
pub fn var(name: &str) -> String {
    LOOPBACK.get(name)
}

/// The value of `name` in the object stores' env file (moto, the GCS emulator, keys).
pub fn object_store_var(name: &str) -> String {
    OBJECT_STORES.get(name)
}
