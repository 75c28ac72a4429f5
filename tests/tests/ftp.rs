//! End-to-end tests of the FTP helper: real vsftpd on the server, real curl and lftp on the
//! client, fwnode in between with a policy that allows NEW only client → server on the control
//! port, plus ESTABLISHED and RELATED. Every data connection therefore passes only if the
//! helper announced it. Files are compared byte for byte.

// Test code: a failed step must fail the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use keepstate_tests::*;

const POLICY: &str = policy!(
    r#"
[[rule]]
name = "ftp-control"
in = "@LAN"
proto = "tcp"
dport = [21, 2121]
ct = "new"
action = "accept"
"#
);

/// vsftpd serving `<lab>/ftp` anonymously (downloads from the root, uploads into `pub/`).
fn vsftpd(lab: &Lab, port: u16) -> Proc {
    let root = lab.dir.join("ftp");
    let empty = lab.dir.join("empty");
    if !root.exists() {
        std::fs::create_dir_all(root.join("pub")).unwrap();
        std::fs::create_dir_all(&empty).unwrap();
        lab.sh(
            "server",
            &format!(
                "chmod 755 {r} && chmod 777 {r}/pub && head -c 1500000 /dev/urandom > {r}/file.bin",
                r = root.display()
            ),
        );
    }
    let conf = lab.dir.join(format!("vsftpd-{port}.conf"));
    std::fs::write(
        &conf,
        format!(
            "listen=NO\nlisten_ipv6=YES\nlisten_port={port}\nbackground=NO\nanonymous_enable=YES\nlocal_enable=NO\n\
             no_anon_password=YES\nwrite_enable=YES\nanon_upload_enable=YES\nanon_umask=022\nanon_root={root}\n\
             connect_from_port_20=YES\nport_enable=YES\npasv_enable=YES\npasv_min_port=40000\npasv_max_port=40100\n\
             seccomp_sandbox=NO\nsecure_chroot_dir={empty}\nxferlog_enable=NO\nvsftpd_log_file={log}\n",
            root = root.display(),
            empty = empty.display(),
            log = lab.dir.join(format!("vsftpd-{port}.xfer")).display()
        ),
    )
    .unwrap();
    let p = lab.spawn(
        "server",
        &format!("/usr/sbin/vsftpd {}", conf.display()),
        &format!("vsftpd-{port}"),
    );
    lab.wait_listen("server", port);
    p
}

fn file(lab: &Lab) -> String {
    lab.dir.join("ftp/file.bin").display().to_string()
}

/// Run curl in the client; returns its exit code. `out` is a path in the lab dir.
fn curl(lab: &Lab, args: &str) -> i32 {
    lab.try_sh(
        "client",
        &format!("curl -sS --max-time 10 --connect-timeout 5 {args}"),
    )
    .status
    .code()
    .unwrap_or(-1)
}

fn same(lab: &Lab, a: &str, b: &str) -> bool {
    lab.try_sh("client", &format!("cmp -s {a} {b}"))
        .status
        .success()
}

fn download(lab: &Lab, name: &str, url: &str, mode: &str) {
    let out = lab.dir.join(name).display().to_string();
    let code = curl(lab, &format!("{mode} -g -o {out} '{url}'"));
    assert_eq!(
        code,
        0,
        "curl {mode} {url} failed; fwnode log:\n{}",
        lab.log("fwnode")
    );
    assert!(
        same(lab, &file(lab), &out),
        "{name}: downloaded file differs"
    );
}

fn upload(lab: &Lab, name: &str, url_dir: &str, mode: &str) {
    let code = curl(
        lab,
        &format!("{mode} -g -T {} '{url_dir}{name}'", file(lab)),
    );
    assert_eq!(code, 0, "upload {mode} {url_dir}{name} failed");
    let stored = lab.dir.join("ftp/pub").join(name).display().to_string();
    assert!(
        same(lab, &file(lab), &stored),
        "{name}: uploaded file differs"
    );
}

#[test]
fn active_and_passive_ipv4_port_eprt_pasv_epsv() {
    let lab = Lab::new();
    let gw = lab.start_fwnode(POLICY, "", "");
    let _ftp = vsftpd(&lab, 21);
    let url = format!("ftp://{SERVER4}/file.bin");
    let dir = format!("ftp://{SERVER4}/pub/");
    download(&lab, "port.bin", &url, "--ftp-port - --disable-eprt");
    download(&lab, "eprt.bin", &url, "--ftp-port -");
    download(&lab, "pasv.bin", &url, "--disable-epsv");
    download(&lab, "epsv.bin", &url, "");
    upload(&lab, "up-active.bin", &dir, "--ftp-port - --disable-eprt");
    upload(&lab, "up-passive.bin", &dir, "--disable-epsv");
    let s = gw.stats();
    assert!(
        metric(&s, "keepstate_ftp_expectations_total", &[]) >= 6,
        "{s}"
    );
    assert!(
        metric(
            &s,
            "keepstate_expectation_events_total",
            &[("event", "matched")]
        ) >= 6,
        "{s}"
    );
    assert!(
        metric(&s, "keepstate_ct_packets_total", &[("state", "related")]) >= 6,
        "{s}"
    );
}

#[test]
fn active_and_passive_ipv6_eprt_epsv() {
    let lab = Lab::new();
    let gw = lab.start_fwnode(POLICY, "", "");
    let _ftp = vsftpd(&lab, 21);
    let url = format!("ftp://[{SERVER6}]/file.bin");
    download(&lab, "eprt6.bin", &url, "--ftp-port -");
    download(&lab, "epsv6.bin", &url, "");
    upload(
        &lab,
        "up6.bin",
        &format!("ftp://[{SERVER6}]/pub/"),
        "--ftp-port -",
    );
    let s = gw.stats();
    assert!(
        metric(&s, "keepstate_ftp_expectations_total", &[]) >= 3,
        "{s}"
    );
}

#[test]
fn lftp_active_download_and_passive_upload() {
    let lab = Lab::new();
    let _gw = lab.start_fwnode(POLICY, "", "");
    let _ftp = vsftpd(&lab, 21);
    let out = lab.dir.join("lftp.bin").display().to_string();
    lab.sh(
        "client",
        &format!(
            "lftp -e 'set net:timeout 5; set net:max-retries 1; set ftp:passive-mode off; get file.bin -o {out}; \
             set ftp:passive-mode on; put {src} -o pub/lftp-up.bin; bye' ftp://{SERVER4}",
            src = file(&lab)
        ),
    );
    assert!(same(&lab, &file(&lab), &out));
    assert!(same(
        &lab,
        &file(&lab),
        &lab.dir.join("ftp/pub/lftp-up.bin").display().to_string()
    ));
}

#[test]
fn non_standard_control_port_configured_as_ftp() {
    let lab = Lab::new();
    let gw = lab.start_fwnode(
        POLICY,
        "",
        "[conntrack]\nhelper_ports = [{ proto = 6, port = 21, helper = \"ftp\" }, { proto = 6, port = 2121, helper = \"ftp\" }]",
    );
    let _ftp = vsftpd(&lab, 2121);
    download(
        &lab,
        "alt-active.bin",
        &format!("ftp://{SERVER4}:2121/file.bin"),
        "--ftp-port - --disable-eprt",
    );
    download(
        &lab,
        "alt-passive.bin",
        &format!("ftp://{SERVER4}:2121/file.bin"),
        "",
    );
    assert!(metric(&gw.stats(), "keepstate_ftp_expectations_total", &[]) >= 2);
}

#[test]
fn without_the_helper_active_ftp_fails() {
    // Proof that the tests above can fail: the same transfer with no helper on port 21.
    let lab = Lab::new();
    let gw = lab.start_fwnode(POLICY, "", "[conntrack]\nhelper_ports = []");
    let _ftp = vsftpd(&lab, 21);
    let out = lab.dir.join("nohelper.bin").display().to_string();
    let code = curl(
        &lab,
        &format!("--ftp-port - --disable-eprt -o {out} ftp://{SERVER4}/file.bin"),
    );
    assert_ne!(
        code, 0,
        "an active transfer must not pass without the helper"
    );
    let code = curl(
        &lab,
        &format!("--disable-epsv -o {out} ftp://{SERVER4}/file.bin"),
    );
    assert_ne!(
        code, 0,
        "a passive transfer must not pass without the helper"
    );
    assert_eq!(metric(&gw.stats(), "keepstate_ftp_lines_total", &[]), 0);
}

/// A scripted control connection (python) on the client: login, then `commands`.
fn control_script(body: &str) -> String {
    format!(
        "import socket,time,sys\nc=socket.create_connection(('{SERVER4}',21),timeout=5)\n\
         c.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1)\nf=c.makefile('rb')\n\
         def reply():\n    l=f.readline().decode()\n    while l[3:4]=='-': l=f.readline().decode()\n    return l\n\
         reply()\nc.sendall(b'USER anonymous\\r\\n'); reply()\nc.sendall(b'PASS x\\r\\n'); reply()\nc.sendall(b'TYPE I\\r\\n'); reply()\n{body}"
    )
}

#[test]
fn a_command_split_across_two_segments_works() {
    let lab = Lab::new();
    let gw = lab.start_fwnode(POLICY, "", "");
    let _ftp = vsftpd(&lab, 21);
    let out = lab.dir.join("split.bin").display().to_string();
    let body = format!(
        "d=socket.socket(); d.bind(('{CLIENT4}',0)); d.listen(1); d.settimeout(8)\np=d.getsockname()[1]\n\
         c.sendall(b'PO'); time.sleep(0.3)\n\
         c.sendall(('RT 198,51,100,10,%d,%d\\r\\n' % (p//256, p%256)).encode()); print(reply().strip())\n\
         c.sendall(b'RETR file.bin\\r\\n'); print(reply().strip())\n\
         s,_=d.accept(); s.settimeout(8)\nw=open('{out}','wb')\nwhile True:\n    b=s.recv(65536)\n    if not b: break\n    w.write(b)\nw.close()\n\
         print(reply().strip())\n"
    );
    let o = lab.sh(
        "client",
        &format!("{} -c {}", python(), shell_quote(&control_script(&body))),
    );
    assert!(o.contains("200 PORT command successful"), "{o}");
    assert!(same(&lab, &file(&lab), &out), "split PORT: {o}");
    let s = gw.stats();
    assert!(
        metric(&s, "keepstate_ftp_expectations_total", &[]) >= 1,
        "{s}"
    );
}

#[test]
fn a_bounce_port_opens_nothing() {
    let lab = Lab::new();
    let gw = lab.start_fwnode(POLICY, "", "");
    let _ftp = vsftpd(&lab, 21);
    let body = "c.sendall(b'PORT 203,0,113,99,0,25\\r\\n'); print(reply().strip())\n\
                c.sendall(b'EPRT |1|203.0.113.99|25|\\r\\n'); print(reply().strip())\n";
    lab.sh(
        "client",
        &format!("{} -c {}", python(), shell_quote(&control_script(body))),
    );
    let s = gw.stats();
    assert_eq!(
        metric(
            &s,
            "keepstate_ftp_rejected_lines_total",
            &[("reason", "bounce")]
        ),
        2,
        "{s}"
    );
    assert_eq!(
        metric(
            &s,
            "keepstate_expectation_events_total",
            &[("event", "created")]
        ),
        0,
        "{s}"
    );
}
