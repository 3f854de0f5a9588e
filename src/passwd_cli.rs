//! `tiermq passwd`: manage the password file (`mqtt.password_file`) without ever writing a
//! plaintext password to disk or to the command line (where `ps` and shell history would keep
//! it): the password is read from standard input.
//!
//! ```text
//! echo 's3cret' | tiermq passwd add /etc/tiermq/passwd alice
//! tiermq passwd remove /etc/tiermq/passwd alice
//! tiermq passwd list /etc/tiermq/passwd
//! echo 's3cret' | tiermq passwd check /etc/tiermq/passwd alice   # exit 0 when it matches
//! ```

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use tiermq_frontend::passwd::PasswordFile;

#[derive(Args, Debug)]
pub struct PasswdArgs {
    #[command(subcommand)]
    action: PasswdAction,
}

#[derive(Subcommand, Debug)]
enum PasswdAction {
    /// Add a user or replace their password (read from standard input, first line).
    /// Creates the file when missing.
    Add { file: PathBuf, user: String },
    /// Remove a user.
    Remove { file: PathBuf, user: String },
    /// List the user names.
    List { file: PathBuf },
    /// Exit 0 when the password on standard input is the user's, 1 otherwise.
    Check { file: PathBuf, user: String },
}

pub fn main(args: PasswdArgs) -> ExitCode {
    match run(args.action) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("passwd: {e}");
            ExitCode::from(2)
        }
    }
}

fn read_password() -> Result<String, String> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| format!("cannot read the password from standard input: {e}"))?;
    let password = line.trim_end_matches(['\n', '\r']).to_string();
    if password.is_empty() {
        return Err("empty password on standard input".into());
    }
    Ok(password)
}

fn load_or_empty(file: &Path) -> Result<PasswordFile, String> {
    if file.exists() {
        PasswordFile::load(file).map_err(|e| e.to_string())
    } else {
        Ok(PasswordFile::default())
    }
}

fn run(action: PasswdAction) -> Result<ExitCode, String> {
    match action {
        PasswdAction::Add { file, user } => {
            let mut f = load_or_empty(&file)?;
            let password = read_password()?;
            let existed = f.contains(&user);
            f.set(&user, password.as_bytes())
                .map_err(|e| e.to_string())?;
            f.save(&file).map_err(|e| e.to_string())?;
            println!(
                "{} {user} in {}",
                if existed { "updated" } else { "added" },
                file.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        PasswdAction::Remove { file, user } => {
            let mut f = PasswordFile::load(&file).map_err(|e| e.to_string())?;
            if !f.remove(&user) {
                return Err(format!("no user {user:?} in {}", file.display()));
            }
            f.save(&file).map_err(|e| e.to_string())?;
            println!("removed {user} from {}", file.display());
            Ok(ExitCode::SUCCESS)
        }
        PasswdAction::List { file } => {
            let f = PasswordFile::load(&file).map_err(|e| e.to_string())?;
            for line in f.render().lines() {
                if let Some((user, _)) = line.split_once(':') {
                    println!("{user}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        PasswdAction::Check { file, user } => {
            let f = PasswordFile::load(&file).map_err(|e| e.to_string())?;
            let password = read_password()?;
            Ok(if f.verify(&user, password.as_bytes()) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
