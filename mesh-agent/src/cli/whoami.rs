//! `mesh-agent whoami`: a tiny test server for tasks. HTTP/1.1 (keep-alive) answers every
//! request with the task's name; UDP echoes `<name> <payload>`. The demo and the tests run
//! one in each task namespace.

use std::net::SocketAddr;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
};

/// Serve until the process is killed.
pub async fn serve(
    name: String,
    http: Vec<SocketAddr>,
    udp: Vec<SocketAddr>,
) -> std::io::Result<()> {
    let mut tasks = Vec::new();
    for addr in http {
        let l = TcpListener::bind(addr).await?;
        let name = name.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                let name = name.clone();
                tokio::spawn(async move {
                    let _ = http_conn(s, &name).await;
                });
            }
        }));
    }
    for addr in udp {
        let s = UdpSocket::bind(addr).await?;
        let name = name.clone();
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, peer)) = s.recv_from(&mut buf).await else {
                    continue;
                };
                let mut reply = Vec::with_capacity(name.len() + 1 + n);
                reply.extend_from_slice(name.as_bytes());
                reply.push(b' ');
                reply.extend_from_slice(&buf[..n]);
                let _ = s.send_to(&reply, peer).await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

async fn http_conn(mut s: TcpStream, name: &str) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let body = format!("{name}\n");
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        // Read one request head.
        let end = loop {
            if let Some(i) = find_head_end(&buf) {
                break i;
            }
            if buf.len() > 64 * 1024 {
                return Ok(());
            }
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let close = head.contains("connection: close")
            || head.starts_with("get / http/1.0") && !head.contains("keep-alive");
        buf.drain(..end);
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{}",
            body.len(),
            if close { "Connection: close\r\n" } else { "" },
            body
        );
        s.write_all(resp.as_bytes()).await?;
        if close {
            return Ok(());
        }
    }
}

fn find_head_end(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}
