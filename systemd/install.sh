#!/bin/sh
# Install (or remove) cartrack-relay as a systemd service. Run through make:
#
#   sudo make install-service      # venv, unit, user, config; keeps what is there
#   sudo make uninstall-service    # venv and unit only; config and outbox stay
#
# Settings (environment or make variables), with their defaults:
#   PREFIX=/opt/cartrack-relay   the venv the package is installed into
#   SYSCONFDIR=/etc/cartrack-relay, UNITDIR=/etc/systemd/system
#   PYTHON=python3               builds the venv (3.11 or newer)
#   DESTDIR=                     a root to install under instead of / (the tests do);
#                                no user is created, nothing chowned, no systemctl.
#                                The venv is built in place, so it runs from there.
#   PACKAGE=<this checkout>      what pip installs: the source tree or a built wheel
#   PIP_INSTALL_ARGS=            extra pip arguments (e.g. --no-index --find-links DIR)
set -eu

SERVICE=cartrack-relay
# The unit's StateDirectory=cartrack-relay: systemd creates it, the installer never
# touches what is in it.
STATEDIR=/var/lib/cartrack-relay
SRC=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${PREFIX:-/opt/cartrack-relay}
SYSCONFDIR=${SYSCONFDIR:-/etc/cartrack-relay}
UNITDIR=${UNITDIR:-/etc/systemd/system}
PYTHON=${PYTHON:-python3}
DESTDIR=${DESTDIR:-}
PACKAGE=${PACKAGE:-}
PIP_INSTALL_ARGS=${PIP_INSTALL_ARGS:-}

VENV=$DESTDIR$PREFIX
CONFDIR=$DESTDIR$SYSCONFDIR
UNIT=$DESTDIR$UNITDIR/$SERVICE.service

say() { printf '%s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check --quiet "$@"; }

staged=
trap '[ -z "$staged" ] || rm -rf "$staged"' EXIT

# systemctl only for the real system: not into a DESTDIR, not where systemd is not PID 1.
systemd_running() { [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; }

ensure_user() {
    if [ -n "$DESTDIR" ]; then
        say "DESTDIR set: not creating the $SERVICE user, not changing owners"
        return
    fi
    if ! getent passwd "$SERVICE" >/dev/null; then
        nologin=$(command -v nologin || echo /usr/sbin/nologin)
        useradd --system --user-group --home-dir "$STATEDIR" --no-create-home \
            --shell "$nologin" --comment "cartrack-relay service" "$SERVICE"
        say "created system user $SERVICE"
    fi
}

# Group-readable by the service, writable by root only: the relay must not be able to
# rewrite its own configuration.
own() { [ -n "$DESTDIR" ] || chown "root:$SERVICE" "$@"; }

install_venv() {
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "$PYTHON is older than Python 3.11 (set PYTHON=...)"
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV"
        say "created venv $VENV"
    fi
    package=$PACKAGE
    if [ -z "$package" ]; then
        # Built from a copy: pip builds in the source tree, and a root-owned build/ and
        # egg-info left in the developer's checkout would get in their way.
        staged=$(mktemp -d)
        tar -C "$SRC" --exclude=__pycache__ -cf - relay setup.cfg pyproject.toml README.md |
            tar -C "$staged" -xf -
        package=$staged
    fi
    # Forced: a rebuilt checkout with an unchanged version number must replace the
    # installed code, not count as "already satisfied".
    # shellcheck disable=SC2086 # PIP_INSTALL_ARGS is a list of words
    pip install --upgrade --force-reinstall $PIP_INSTALL_ARGS "$package"
    say "installed $("$VENV/bin/python" -c 'import relay; print("cartrack-relay", relay.__version__)') into $VENV"
}

install_unit() {
    mkdir -p "$(dirname "$UNIT")"
    sed -e "s#/opt/cartrack-relay#$PREFIX#g" -e "s#/etc/cartrack-relay#$SYSCONFDIR#g" \
        "$SRC/systemd/$SERVICE.service" >"$UNIT.tmp"
    chmod 0644 "$UNIT.tmp"
    mv "$UNIT.tmp" "$UNIT"
    say "installed unit $UNIT"
}

install_config() {
    install -d -m 0750 "$CONFDIR"
    own "$CONFDIR"
    config=$CONFDIR/config.toml
    if [ -e "$config" ]; then
        say "kept existing $config"
    else
        # The example, with the outbox at its absolute path (operator commands then
        # find it from any directory) and no api_key line: the key comes from the
        # credential file below instead.
        sed -e "s#^path = \"outbox.sqlite3\"#path = \"$STATEDIR/outbox.sqlite3\"#" \
            -e 's/^api_key = /# api_key = /' \
            "$SRC/config.example.toml" >"$config.tmp"
        chmod 0640 "$config.tmp"
        own "$config.tmp"
        mv "$config.tmp" "$config"
        say "wrote $config (edit it: tokens, region, vehicles)"
    fi
    key=$CONFDIR/api_key
    if [ -e "$key" ]; then
        say "kept existing $key"
    else
        # Empty: the relay refuses to start (exit 2, "cartrack.api_key is required")
        # until the key is written. systemd reads it as root (LoadCredential=).
        (umask 077 && : >"$key")
        say "created empty $key (0600 root): write the Cartrack API key into it"
    fi
}

do_install() {
    if [ -z "$DESTDIR" ] && [ "$(id -u)" != 0 ]; then
        die "run as root (sudo make install-service), or set DESTDIR to install elsewhere"
    fi
    ensure_user
    install_venv
    install_unit
    install_config
    if systemd_running; then
        systemctl daemon-reload
        if systemctl is-active --quiet "$SERVICE"; then
            say "$SERVICE is running the old code: systemctl restart $SERVICE"
        else
            say "start it with: systemctl enable --now $SERVICE"
        fi
    fi
    if [ -e "$DESTDIR$STATEDIR/outbox.sqlite3" ]; then
        say "outbox $STATEDIR/outbox.sqlite3 left as it is (migrations run on start)"
    fi
}

do_uninstall() {
    if [ -z "$DESTDIR" ] && [ "$(id -u)" != 0 ]; then
        die "run as root (sudo make uninstall-service), or set DESTDIR"
    fi
    if systemd_running; then
        systemctl disable --now "$SERVICE" 2>/dev/null || true
    fi
    rm -f "$UNIT"
    # Only ever a directory that is recognisably our venv: PREFIX=/ must not be fatal.
    if [ -f "$VENV/pyvenv.cfg" ] && [ -e "$VENV/bin/cartrack-relay" ]; then
        rm -rf "$VENV"
        say "removed $VENV"
    elif [ -e "$VENV" ]; then
        say "left $VENV alone: it does not look like the cartrack-relay venv"
    fi
    if systemd_running; then
        systemctl daemon-reload
    fi
    say "removed unit $UNIT"
    say "kept configuration: $CONFDIR (config.toml, api_key)"
    say "kept data: $DESTDIR$STATEDIR (outbox.sqlite3: positions not yet delivered live here)"
    [ -n "$DESTDIR" ] || say "kept user: $SERVICE (owns the data)"
}

case ${1:-} in
    install) do_install ;;
    uninstall) do_uninstall ;;
    *) die "usage: $0 install|uninstall" ;;
esac
