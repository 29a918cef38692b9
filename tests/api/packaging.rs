//! The deployable app: what `scripts/package.sh` assembles.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use handler::definition::FunctionName;

use crate::fake_azure::{FakeServiceBus, SAS_KEY, SAS_KEY_NAME};

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

#[test]
fn the_package_is_a_function_app_folder_and_a_zip_that_keeps_the_exec_bit() {
    let out = tempfile::tempdir().unwrap();
    let status = Command::new(repo_root().join("scripts/package.sh"))
        .args(["--binary", env!("CARGO_BIN_EXE_handler"), "--out"])
        .arg(out.path())
        .status()
        .unwrap();
    assert!(status.success());

    let app = out.path().join("func-sync");
    let host: serde_json::Value =
        serde_json::from_slice(&std::fs::read(app.join("host.json")).unwrap()).unwrap();
    assert_eq!(
        host["customHandler"]["description"]["defaultExecutablePath"],
        "handler"
    );
    assert_eq!(host["extensionBundle"]["version"], "[4.*, 5.0.0)");
    let mode = std::fs::metadata(app.join("handler"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o755, 0o755, "handler is executable");
    for function in FunctionName::ALL {
        let packaged = std::fs::read(app.join(function.as_str()).join("function.json")).unwrap();
        let source = std::fs::read(
            repo_root()
                .join("functions")
                .join(function.as_str())
                .join("function.json"),
        )
        .unwrap();
        assert_eq!(packaged, source, "{function}");
    }

    let listing = Command::new("zipinfo")
        .arg(out.path().join("func-sync.zip"))
        .output()
        .unwrap();
    assert!(listing.status.success());
    let listing = String::from_utf8(listing.stdout).unwrap();
    let handler_line = listing
        .lines()
        .find(|l| l.ends_with(" handler"))
        .unwrap_or_else(|| panic!("no handler in the zip:\n{listing}"));
    assert!(handler_line.starts_with("-rwxr-xr-x"), "{handler_line}");
    assert!(listing.lines().any(|l| l.ends_with(" host.json")));
    for function in FunctionName::ALL {
        let entry = format!(" {function}/function.json");
        assert!(
            listing.lines().any(|l| l.ends_with(&entry)),
            "{function} missing:\n{listing}"
        );
    }
}

/// `00:10:00` as a number of seconds.
fn timespan_seconds(text: &str) -> u64 {
    text.split(':')
        .map(|part| part.parse::<u64>().unwrap())
        .fold(0, |total, part| total * 60 + part)
}

#[test]
fn a_message_lock_is_renewed_for_as_long_as_a_function_may_run() {
    let host: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo_root().join("host.json")).unwrap()).unwrap();
    let timeout = timespan_seconds(host["functionTimeout"].as_str().unwrap());
    let renewal = timespan_seconds(
        host["extensions"]["serviceBus"]["maxAutoLockRenewalDuration"]
            .as_str()
            .unwrap(),
    );
    assert!(
        renewal >= timeout,
        "locks renewed for {renewal} s while a function may run {timeout} s: a long job's \
         message would be delivered to a second instance while the first still runs"
    );
}

#[test]
fn a_session_with_nothing_more_to_write_back_gives_its_place_up_within_seconds() {
    let host: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo_root().join("host.json")).unwrap()).unwrap();
    let service_bus = &host["extensions"]["serviceBus"];
    let idle = timespan_seconds(service_bus["sessionIdleTimeout"].as_str().unwrap());
    let sessions = service_bus["maxConcurrentSessions"].as_u64().unwrap();
    // One integration's write-backs are one session, and most send one or two: an instance
    // holding each session a minute after its last message would write back for no more than
    // `sessions` integrations a minute.
    assert!(
        idle <= 10,
        "a session is held {idle} s after its last message: an instance writes back for at \
         most {} integrations a minute",
        sessions * 60 / idle.max(1)
    );
}

/// Whether an ELF executable names a program interpreter (`PT_INTERP`): a dynamically linked
/// binary does, and then needs the image's C library and its name-service modules at run time.
fn has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(elf[4], 2, "not a 64-bit ELF file");
    let u16_at = |at: usize| u16::from_le_bytes(elf[at..at + 2].try_into().unwrap()) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) == PT_INTERP
    })
}

/// The packaged binary runs on whatever Linux image the Functions host has: it is linked
/// statically against musl (no interpreter, so neither the image's glibc nor its NSS modules),
/// and it resolves a host name by itself and talks to it.
#[tokio::test]
async fn the_packaged_binary_is_static_and_resolves_host_names() {
    let Some(app) = std::env::var_os("FUNC_SYNC_PACKAGED_APP") else {
        eprintln!(
            "skipped: FUNC_SYNC_PACKAGED_APP is not set (.ci/run packages the app with \
             scripts/package.sh and points it at the app folder)"
        );
        return;
    };
    let binary = Path::new(&app).join("handler");
    let elf = std::fs::read(&binary).unwrap();
    assert!(
        !has_interpreter(&elf),
        "{} is dynamically linked",
        binary.display()
    );
    assert!(has_interpreter(
        &std::fs::read(env!("CARGO_BIN_EXE_handler")).unwrap()
    ));

    // Service Bus by name: `localhost`, which only a resolver can turn into an address.
    let service_bus = FakeServiceBus::start().await;
    let port = service_bus.host.rsplit_once(':').unwrap().1;
    let connection = format!(
        "Endpoint=sb://localhost:{port};SharedAccessKeyName={SAS_KEY_NAME};\
         SharedAccessKey={SAS_KEY};UseDevelopmentEmulator=true"
    );
    let data = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(&binary)
        .args(["dead-letters", "list", "--json"])
        .env("FUNC_SYNC_DATA_DIR", data.path())
        .env("ServiceBusConnection", connection)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    assert!(service_bus.refusals.lock().unwrap().is_empty());
    assert!(
        service_bus.requests() >= 5,
        "one read per dead-letter entity"
    );
}
