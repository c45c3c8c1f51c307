# Sourced by ab_h2.sh and callgrind_h2.sh: the HTTPS h2 row's setup, written once so that the
# two measure the same thing. W is the work folder; ports are on 127.0.0.1.

# A P-256 certificate for localhost and 127.0.0.1: W/cert.pem, W/key.pem.
h2_cert() {
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" -keyout $1/key.pem -out $1/cert.pem 2>/dev/null
}

# The start of an nginx config: WORKERS, its folder DIR (pid, logs, temp paths), keep-alive.
nginx_common() { echo "worker_processes $1; pid $2/nginx.pid; error_log $2/error.log; events { worker_connections 4096; } http { access_log off; client_body_temp_path $2/t1; proxy_temp_path $2/t2; fastcgi_temp_path $2/t3; uwsgi_temp_path $2/t4; scgi_temp_path $2/t5; keepalive_requests 1000000; keepalive_timeout 75s;"; }

# The upstream, started: nginx, 1 worker, `return 200` with 100 bytes on PORT; config in W/up.
h2_upstream() {
  local body; body=$(head -c 100 /dev/zero | tr '\0' 'x')
  mkdir -p $1/up
  { nginx_common 1 $1/up; echo "server { listen 127.0.0.1:$2; location / { return 200 '$body'; } } }"; } > $1/up/nginx.conf
  nginx -c $1/up/nginx.conf
}

# intermission's config in DIR/config.toml: threads = 1, TLS on TLSPORT with W's certificate,
# forwarding to UPPORT, access log off.   h2_im_config DIR UPPORT TLSPORT W
h2_im_config() {
  mkdir -p $1; cat > $1/config.toml <<EOC
[proxy]
listen = []
threads = 1
[upstream]
servers = ["http://127.0.0.1:$2"]
[health]
interval = "5s"
[log]
access_log = false
level = "warn"
[control]
socket = "$1/control.sock"
state_file = "$1/state.json"
[tls]
listen = ["127.0.0.1:$3"]
[[tls.certificates]]
cert = "$4/cert.pem"
key = "$4/key.pem"
EOC
}
