//! The documentation qlog generates for packaging: a man page per subcommand from
//! `qlog man --dir`, the single page `qlog man` prints, and shell completions. Each is
//! generated from the real binary and read back the way a packager's tools would.

use std::process::Command;

use qlog_tests::bin_path;

/// Every subcommand an operator can run, each of which must have its own page.
const SUBCOMMANDS: [&str; 11] = [
    "tail",
    "query",
    "vms",
    "stats",
    "top",
    "metrics",
    "export",
    "bundle",
    "bundle-verify",
    "verify",
    "demo",
];

fn qlog(args: &[&str]) -> std::process::Output {
    Command::new(bin_path("qlog")).args(args).output().expect("qlog runs")
}

#[test]
fn man_dir_writes_a_page_per_subcommand_and_no_page_for_hidden_ones() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let out = qlog(&["man", "--dir", dir.path().to_str().expect("a UTF-8 path")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let page = |name: &str| {
        let path = dir.path().join(format!("{name}.1"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let main = page("qlog");
    assert!(main.contains(".TH qlog 1"), "{main:.200}");
    for sub in SUBCOMMANDS {
        let text = page(&format!("qlog-{sub}"));
        assert!(text.contains(&format!(".TH qlog-{sub} 1")), "qlog-{sub}.1: {text:.300}");
    }
    // Options are documented where they apply: roff escapes each dash.
    assert!(page("qlog-tail").contains("\\-\\-no\\-follow"));
    assert!(page("qlog-query").contains("\\-\\-reverse"));
    assert!(page("qlog-export").contains("\\-\\-output"));
    // Generators and helpers are not for operators and get no page.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("the directory reads")
        .map(|e| e.expect("an entry").file_name().to_string_lossy().into_owned())
        .collect();
    for hidden in ["qlog-man.1", "qlog-completions.1", "qlog-help.1"] {
        assert!(!names.iter().any(|n| n == hidden), "{hidden} in {names:?}");
    }
}

#[test]
fn man_without_dir_prints_the_main_page_and_a_bad_dir_is_a_clear_error() {
    let out = qlog(&["man"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("roff is UTF-8");
    assert!(text.contains(".TH qlog 1") && text.contains("tail"), "{text:.300}");

    let out = qlog(&["man", "--dir", "/nonexistent/qlog-man"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/qlog-man") && stderr.contains("directory"), "{stderr}");
}

#[test]
fn completions_cover_every_subcommand_in_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let out = qlog(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", String::from_utf8_lossy(&out.stderr));
        let script = String::from_utf8(out.stdout).expect("completion scripts are UTF-8");
        for sub in ["tail", "query", "vms", "export", "verify"] {
            assert!(script.contains(sub), "{shell} completion lacks {sub}");
        }
        assert!(script.contains("no-follow"), "{shell} completion lacks --no-follow");
    }
}
