//! The demo's pod programs: a tiny sidecar proxy, a tiny application, and a client.
//!
//! `sidecar` plays the mesh's proxy: it accepts on the outbound and inbound redirect ports, reads
//! the original destination (`SO_ORIGINAL_DST`), logs the hop, and forwards the bytes there. Run as
//! the proxy's UID, its own connections are let through by the redirect rules. It can be told to
//! deny sources (one IP per line in a file re-read on every connection), standing in for a mesh
//! intention. `app` answers every connection with a greeting; `call` dials and prints the answer.
//!
//! It is a demonstration and test program, not part of the plugin.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tproxy_cni::kernel::origdst::original_dst;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Accept redirected connections and forward them to where they were going.
    Sidecar {
        /// Name used in log lines and refusals.
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = 15001)]
        outbound_port: u16,
        #[arg(long, default_value_t = 20000)]
        inbound_port: u16,
        /// File with source IPs to refuse on the inbound side, one per line.
        #[arg(long)]
        deny_file: Option<PathBuf>,
    },
    /// Answer every connection on PORT with "hello from NAME".
    App {
        #[arg(long)]
        name: String,
        #[arg(long)]
        port: u16,
    },
    /// Dial ADDR and print what comes back.
    Call { addr: SocketAddr },
}

fn main() {
    match Cli::parse().cmd {
        Cmd::Sidecar { name, outbound_port, inbound_port, deny_file } => {
            let inbound = listen(inbound_port);
            let (n, d) = (name.clone(), deny_file.clone());
            std::thread::spawn(move || serve(inbound, &n, "inbound", d.as_ref()));
            serve(listen(outbound_port), &name, "outbound", None);
        }
        Cmd::App { name, port } => {
            for conn in listen(port).incoming().flatten() {
                let peer = conn.peer_addr().map(|p| p.ip().to_string()).unwrap_or_default();
                let mut conn = conn;
                let _ = writeln!(conn, "hello from {name} (the app saw the call come from {peer})");
            }
        }
        Cmd::Call { addr } => match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
            Ok(mut s) => {
                let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
                let mut out = String::new();
                let _ = s.read_to_string(&mut out);
                print!("{out}");
            }
            Err(e) => {
                println!("call to {addr} failed: {e}");
                std::process::exit(1);
            }
        },
    }
}

fn listen(port: u16) -> TcpListener {
    TcpListener::bind(("0.0.0.0", port)).unwrap_or_else(|e| panic!("bind {port}: {e}"))
}

fn serve(l: TcpListener, name: &str, side: &str, deny_file: Option<&PathBuf>) {
    for conn in l.incoming().flatten() {
        let (name, side, deny) = (name.to_owned(), side.to_owned(), deny_file.cloned());
        std::thread::spawn(move || hop(conn, &name, &side, deny.as_ref()));
    }
}

fn hop(mut client: TcpStream, name: &str, side: &str, deny_file: Option<&PathBuf>) {
    let peer = client.peer_addr().map(|p| p.ip()).unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let Ok(to) = original_dst(&client) else {
        let _ = writeln!(client, "{name}: connection was not redirected");
        return;
    };
    if deny_file.is_some_and(|f| denied(f, peer)) {
        println!("{name}: {side} {peer} -> {to}: DENIED by intention");
        let _ = writeln!(client, "denied by {name}: intention forbids {peer}");
        return;
    }
    println!("{name}: {side} {peer} -> {to}: forwarded");
    let Ok(upstream) = TcpStream::connect_timeout(&to, Duration::from_secs(3)) else {
        let _ = writeln!(client, "{name}: cannot reach {to}");
        return;
    };
    let (mut c2, mut u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
    let mut upstream = upstream;
    let t = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c2, &mut u2);
        let _ = u2.shutdown(Shutdown::Write);
    });
    let _ = std::io::copy(&mut upstream, &mut client);
    let _ = client.shutdown(Shutdown::Write);
    let _ = t.join();
}

fn denied(file: &PathBuf, peer: IpAddr) -> bool {
    let Ok(f) = std::fs::File::open(file) else { return false };
    BufReader::new(f).lines().map_while(Result::ok).any(|l| l.trim().parse::<IpAddr>().is_ok_and(|ip| ip == peer))
}
