//! The deployable app: what `scripts/package.sh` assembles, and what `infra/` provisions.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use handler::definition::FunctionName;
use handler::queue::QUEUES;

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

#[test]
fn the_provisioned_queues_are_the_ones_the_app_assumes() {
    let bicep = std::fs::read_to_string(repo_root().join("infra/servicebus.bicep")).unwrap();
    let field = |block: &str, name: &str| -> String {
        let line = block
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{name}:")))
            .unwrap_or_else(|| panic!("{name} missing in {block}"));
        line.split_once(':')
            .unwrap()
            .1
            .trim()
            .trim_matches('\'')
            .to_string()
    };
    for queue in QUEUES {
        let start = bicep
            .find(&format!("name: '{}'", queue.name))
            .unwrap_or_else(|| panic!("{} is not provisioned", queue.name));
        let block = &bicep[start..start + bicep[start..].find('}').unwrap()];
        assert_eq!(
            field(block, "maxDeliveryCount"),
            queue.max_delivery_count.to_string(),
            "{}",
            queue.name
        );
        assert_eq!(
            field(block, "lockDuration"),
            format!("PT{}M", queue.lock_duration.as_secs() / 60),
            "{}",
            queue.name
        );
        assert_eq!(
            field(block, "defaultMessageTimeToLive"),
            format!("P{}D", queue.time_to_live.as_secs() / 86_400),
            "{}",
            queue.name
        );
        assert_eq!(
            field(block, "requiresSession"),
            queue.requires_session.to_string(),
            "{}",
            queue.name
        );
        assert_eq!(
            field(block, "deadLetteringOnMessageExpiration"),
            queue.dead_letter_on_expiration.to_string(),
            "{}",
            queue.name
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
