//! The "Examples:" section of each command's `--help`: short command lines to copy. A test
//! parses every one of them with the CLI's own parser, so that they keep working as the flags
//! change.

pub const RUN: &str = r#"Examples:
  aiki run start hello --input '{"name":"Ada"}' --key hello-ada --wait
  aiki run list --status running
  aiki run result --key hello-ada --wait 30"#;

pub const RUN_START: &str = r#"Examples:
  aiki run start hello --input '{"name":"Ada"}' --key hello-ada
  aiki run start hello --input @input.json --wait 30
  aiki run start report --queue nightly --delay 1h --priority 10
  aiki run start report --workflow-version v2 --max-attempts 5 --execution-timeout 1h"#;

pub const RUN_GET: &str = "\
Examples:
  aiki run get --key hello-ada
  aiki run get 0197a3c4-5d1e-7f20-8b3a-4c5d6e7f8091
  aiki run get --key hello-ada -o json";

pub const RUN_RESULT: &str = "\
Examples:
  aiki run result --key hello-ada
  aiki run result --key hello-ada --wait 30
  aiki run result 0197a3c4-5d1e-7f20-8b3a-4c5d6e7f8091 --wait 60 -o json";

pub const RUN_LIST: &str = "\
Examples:
  aiki run list
  aiki run list --workflow hello --status completed --since 1h
  aiki run list --status failed --status cancelled --limit 10
  aiki run list --parent 0197a3c4-5d1e-7f20-8b3a-4c5d6e7f8091
  aiki run list -o json --limit 5";

pub const RUN_CANCEL: &str = r#"Examples:
  aiki run cancel --key hello-later --reason "changed my mind"
  aiki run cancel 0197a3c4-5d1e-7f20-8b3a-4c5d6e7f8091"#;

pub const RUN_PAUSE: &str = r#"Examples:
  aiki run pause --key hello-later --reason "not yet"
  aiki run pause 0197a3c4-5d1e-7f20-8b3a-4c5d6e7f8091"#;

pub const RUN_RESUME: &str = "\
Examples:
  aiki run resume --key hello-later
  aiki run resume 0197a3c4-5d1e-7f20-8b3a-4c5d6e7f8091";

pub const RUN_WAKE: &str = "\
Examples:
  aiki run wake --key trial-bob
  aiki run wake 0197a3c4-5d1e-7f20-8b3a-4c5d6e7f8091";

pub const RUN_EVENT: &str = r#"Examples:
  aiki run event --key hello-later approved --data '{"by":"ada"}'
  aiki run event 0197a3c4-5d1e-7f20-8b3a-4c5d6e7f8091 approved
  aiki run event --key trial-ada payment --data @payment.json --event-key invoice-1"#;

pub const RUN_HISTORY: &str = "\
Examples:
  aiki run history --key hello-ada
  aiki run history 0197a3c4-5d1e-7f20-8b3a-4c5d6e7f8091 -o json";

pub const RUN_WATCH: &str = "\
Examples:
  aiki run watch --key hello-ada
  aiki run watch 0197a3c4-5d1e-7f20-8b3a-4c5d6e7f8091 -o json";

pub const WORKERS: &str = "\
Examples:
  aiki workers
  aiki workers --all -o json
  aiki --server https://aiki.internal:7070 --tls-ca ca.pem workers";

pub const QUEUES: &str = "\
Examples:
  aiki queues
  aiki queues --namespace billing -o json";

pub const WORKFLOWS: &str = "\
Examples:
  aiki workflows
  aiki workflows -o json";

pub const KEYS: &str = "\
Examples:
  aiki keys create --role client --namespace billing
  aiki keys list --all";

pub const KEYS_CREATE: &str = r#"Examples:
  aiki keys create --role client --namespace billing
  aiki keys create --role worker --name "billing workers" --rate-limit 500
  aiki keys create --role read --namespace billing --also reports,audit"#;

pub const KEYS_LIST: &str = "\
Examples:
  aiki keys list
  aiki keys list --all -o json";

pub const KEYS_REVOKE: &str = "\
Examples:
  aiki keys revoke 0197a3c4-5d1e-7f20-8b3a-4c5d6e7f8091";

pub const MIGRATE: &str = "\
Examples:
  aiki migrate
  aiki migrate --database-url postgres://aiki:aiki@db.internal:5432/aiki";

pub const DEV: &str = "\
Examples:
  aiki dev
  aiki dev --tls
  aiki --server http://127.0.0.1:7071 dev --no-worker
  aiki dev postgres";

pub const DEV_POSTGRES: &str = "\
Examples:
  aiki dev postgres
  aiki dev postgres --database-url postgres://aiki:aiki@127.0.0.1:5433/aiki";

pub const COMPLETION: &str = "\
Examples:
  aiki completion bash > ~/.local/share/bash-completion/completions/aiki
  aiki completion zsh > ~/.zfunc/_aiki";

pub const MAN: &str = "\
Examples:
  aiki man | man -l -";

pub const BENCH: &str = "\
Examples:
  aiki bench
  aiki bench --runs 5000 --phases enqueue-batch,drain --workers 2
  aiki bench --tls --runs 5000
  aiki --server http://127.0.0.1:7070 bench --server-pid 4242 --phases drain";

#[cfg(test)]
mod tests {
    use clap::{Command, CommandFactory, Parser};

    use crate::Cli;

    /// The command lines of the "Examples:" section of `help`, each split into arguments as a
    /// shell would, up to a pipe or a redirection.
    fn examples(help: &str) -> Vec<(String, Vec<String>)> {
        let Some((_, section)) = help.split_once("Examples:\n") else {
            return Vec::new();
        };
        section
            .lines()
            .take_while(|l| l.starts_with("  "))
            .map(|line| {
                let line = line.trim();
                let args = shlex::split(line).unwrap_or_else(|| panic!("unbalanced quotes in {line:?}"));
                let args = args
                    .into_iter()
                    .take_while(|a| !["|", ">", ">>", "&&"].contains(&a.as_str()))
                    .collect();
                (line.to_owned(), args)
            })
            .collect()
    }

    /// Every visible command, with the names leading to it (`["run", "get"]`).
    fn commands(cmd: &Command, path: &[String], out: &mut Vec<(Vec<String>, Command)>) {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            let mut path = path.to_vec();
            path.push(sub.get_name().to_owned());
            commands(sub, &path, out);
            out.push((path, sub.clone()));
        }
    }

    #[test]
    fn every_command_shows_examples_that_parse() {
        let mut all = Vec::new();
        commands(&Cli::command(), &[], &mut all);
        assert!(all.len() > 15, "found the commands: {}", all.len());
        for (path, cmd) in &all {
            let name = path.join(" ");
            // `-h` shows `after_help`; `--help` shows `after_long_help` when there is one.
            let short = cmd.get_after_help().map(|h| h.to_string()).unwrap_or_default();
            let long = cmd.get_after_long_help().map(|h| h.to_string());
            for help in [Some(short), long].into_iter().flatten() {
                let found = examples(&help);
                assert!(
                    !found.is_empty(),
                    "aiki {name} --help shows no Examples section:\n{help}"
                );
                for (line, args) in found {
                    assert_eq!(args.first().map(String::as_str), Some("aiki"), "{line}");
                    let matches = Cli::command()
                        .try_get_matches_from(&args)
                        .unwrap_or_else(|e| panic!("example of aiki {name} does not parse: {line}\n{e}"));
                    // It is an example of this very command (or, for a group, of one of its own).
                    let mut got = Vec::new();
                    let mut m = &matches;
                    while let Some((sub, next)) = m.subcommand() {
                        got.push(sub.to_owned());
                        m = next;
                    }
                    assert!(
                        got.starts_with(path),
                        "the example {line:?} in the help of aiki {name} runs aiki {}",
                        got.join(" ")
                    );
                    Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{line}: {e}"));
                }
            }
        }
    }
}
