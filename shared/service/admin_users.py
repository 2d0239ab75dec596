"""Administrators of the job dashboard (/admin): accounts and server-side login sessions.

* Passwords are hashed with scrypt (werkzeug.security, salted, N=2**15) and never stored or logged in clear.
* A login creates an `AdminSession` row; the browser only holds a random 256-bit session id in an HttpOnly,
  SameSite=Strict cookie, and the database stores its SHA-256. Logging out, disabling the account or changing the
  password ends the session everywhere at once (no shared signing secret between API processes is needed).
* Each session has its own CSRF token, required on every state-changing admin request.

This module imports no Flask: the CLI (`covidseg admin create`) and the API both use it.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime, timedelta

from sqlalchemy import ForeignKey, Index, Integer, String, Text, select, update
from sqlalchemy.orm import Mapped, mapped_column

from shared.service.db import Base, BigIntPK, UTCDateTime, utcnow

PASSWORD_METHOD = "scrypt:32768:8:1"
MIN_PASSWORD_LENGTH = 12
USERNAME_MAX = 64


class AdminUser(Base):
    __tablename__ = "admin_users"
    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(USERNAME_MAX), nullable=False, unique=True)
    password_hash: Mapped[str] = mapped_column(String(255), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    password_changed_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class AdminSession(Base):
    __tablename__ = "admin_sessions"
    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    session_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    user_id: Mapped[int] = mapped_column(BigIntPK, ForeignKey("admin_users.id", ondelete="CASCADE"),
                                         nullable=False)
    csrf_token: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    __table_args__ = (Index("ix_admin_sessions_expires_at", "expires_at"),)


class AdminAction(Base):
    """Audit trail of what administrators did to jobs (retry, cancel): who, when, and the state before."""
    __tablename__ = "admin_actions"
    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32), nullable=False)
    username: Mapped[str] = mapped_column(String(USERNAME_MAX), nullable=False)
    action: Mapped[str] = mapped_column(String(16), nullable=False)
    from_status: Mapped[str] = mapped_column(String(16), nullable=False)
    previous_error: Mapped[str | None] = mapped_column(Text)
    previous_attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    previous_worker: Mapped[str | None] = mapped_column(String(200))
    at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    __table_args__ = (Index("ix_admin_actions_job_at", "job_id", "at"),)


def record_action(session, job, username: str, action: str) -> AdminAction:
    row = AdminAction(job_id=job.id, username=username, action=action, from_status=job.status,
                      previous_error=job.error, previous_attempts=job.attempts or 0, previous_worker=job.worker,
                      at=utcnow())
    session.add(row)
    session.flush()
    return row


def actions_of(session, job_id: str) -> list[AdminAction]:
    return list(session.scalars(select(AdminAction).where(AdminAction.job_id == job_id)
                                .order_by(AdminAction.at, AdminAction.id)).all())


class AdminError(ValueError):
    """A user name or password that cannot be accepted (message is shown to the operator)."""


# --- passwords -------------------------------------------------------------------------------------------------
def hash_password(password: str) -> str:
    from werkzeug.security import generate_password_hash
    return generate_password_hash(password, method=PASSWORD_METHOD)


def check_password(password_hash: str, password: str) -> bool:
    from werkzeug.security import check_password_hash
    return check_password_hash(password_hash, password)


#: Checked against when the user does not exist, so that a wrong user name costs as much time as a wrong password.
_DUMMY_HASH: str | None = None


def _dummy_hash() -> str:
    global _DUMMY_HASH
    if _DUMMY_HASH is None:
        _DUMMY_HASH = hash_password(secrets.token_urlsafe(16))
    return _DUMMY_HASH


def validate_username(username: str) -> str:
    name = (username or "").strip()
    if not name or len(name) > USERNAME_MAX or not all(c.isalnum() or c in "._-@" for c in name):
        raise AdminError(f"the user name must be 1-{USERNAME_MAX} letters, digits or . _ - @")
    return name


def validate_password(password: str) -> str:
    if len(password or "") < MIN_PASSWORD_LENGTH:
        raise AdminError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    return password


# --- accounts --------------------------------------------------------------------------------------------------
def get_user(session, username: str) -> AdminUser | None:
    return session.scalar(select(AdminUser).where(AdminUser.username == username.strip()))


def create_admin(session, username: str, password: str, *, replace_password: bool = False) -> AdminUser:
    """Create an admin (or, with replace_password, set a new password for an existing one: ends its sessions)."""
    name = validate_username(username)
    validate_password(password)
    user = get_user(session, name)
    now = utcnow()
    if user is not None:
        if not replace_password:
            raise AdminError(f"admin {name!r} already exists (use --reset-password to set a new password)")
        user.password_hash = hash_password(password)
        user.password_changed_at = now
        user.disabled_at = None
        session.execute(AdminSession.__table__.delete().where(AdminSession.user_id == user.id))
        session.flush()
        return user
    user = AdminUser(username=name, password_hash=hash_password(password), created_at=now, password_changed_at=now)
    session.add(user)
    session.flush()
    return user


def authenticate(session, username: str, password: str) -> AdminUser | None:
    """The enabled admin with this user name and password, else None (same cost either way)."""
    user = get_user(session, username or "") if username else None
    if user is None:
        check_password(_dummy_hash(), password or "")
        return None
    ok = check_password(user.password_hash, password or "")
    if not ok or user.disabled_at is not None:
        return None
    return user


def disable_admin(session, username: str) -> bool:
    user = get_user(session, username)
    if user is None:
        return False
    user.disabled_at = utcnow()
    session.execute(AdminSession.__table__.delete().where(AdminSession.user_id == user.id))
    session.flush()
    return True


# --- sessions --------------------------------------------------------------------------------------------------
def _hash(sid: str) -> str:
    return hashlib.sha256(sid.encode("utf-8")).hexdigest()


def start_session(session, user: AdminUser, lifetime: timedelta) -> tuple[str, AdminSession]:
    """(cookie value, row). The cookie value is shown to the browser only."""
    sid = secrets.token_urlsafe(32)
    now = utcnow()
    row = AdminSession(session_hash=_hash(sid), user_id=user.id, csrf_token=secrets.token_urlsafe(32),
                       created_at=now, last_seen_at=now, expires_at=now + lifetime)
    session.add(row)
    user.last_login_at = now
    # housekeeping: expired sessions of everybody
    session.execute(AdminSession.__table__.delete().where(AdminSession.expires_at < now))
    session.flush()
    return sid, row


def load_session(session, sid: str | None, idle_timeout: timedelta | None = None
                 ) -> tuple[AdminSession, AdminUser] | None:
    """The live session and its enabled user for a cookie value, else None. Touches last_seen_at."""
    if not sid or len(sid) > 200:
        return None
    row = session.scalar(select(AdminSession).where(AdminSession.session_hash == _hash(sid)))
    now = utcnow()
    if row is None or row.expires_at <= now:
        return None
    if idle_timeout is not None and row.last_seen_at + idle_timeout <= now:
        return None
    user = session.get(AdminUser, row.user_id)
    if user is None or user.disabled_at is not None:
        return None
    if (now - row.last_seen_at).total_seconds() > 60:   # do not write on every request
        session.execute(update(AdminSession).where(AdminSession.id == row.id).values(last_seen_at=now))
    return row, user


def end_session(session, sid: str | None) -> None:
    if sid:
        session.execute(AdminSession.__table__.delete().where(AdminSession.session_hash == _hash(sid)))


def csrf_matches(expected: str | None, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected), str(given))
