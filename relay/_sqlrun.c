/* The outbox writer's own access to SQLite: its statements, and its WAL.
 *
 * Both work on the sqlite3 module's own connection and SQLite library, and stand in
 * for what the sqlite3 module does at two costs only the writer's thread pays
 * (bench/README.md, "The ingest path, eighth pass"); relay/outbox/connection.py uses
 * them and falls back to the sqlite3 module where they are missing.
 *
 *   link(sqlite3_module_path, sqlite3.Connection, sqlite3.ProgrammingError) -> str
 *       Finds SQLite's functions in the library the sqlite3 module is linked with
 *       (dlopen of the loaded module, dlsym through its dependencies) and returns
 *       its version, for the caller to check against sqlite3.sqlite_version. Raises
 *       OSError when they cannot be found.
 *
 *   Statement(connection, sql), Statement.run(connection, values, start, rows, width)
 *       Through the sqlite3 module a statement binds every value with the GIL held,
 *       copying each text, then gives the GIL up around sqlite3_step and again
 *       around sqlite3_reset, each time winning it back from the busy event loop.
 *       run() binds values[start : start + rows * width] in place (the objects are
 *       held until the step is over), repeating the first row up to the statement's
 *       own size (INSERT OR IGNORE padding), and gives the GIL up once for step and
 *       reset together; it returns sqlite3_changes(). A failure raises
 *       Failure(extended_code, message), which connection.py turns into what the
 *       sqlite3 module raises. A statement without parameters runs with rows 0.
 *
 *   register_vfs() -> "relay-wal"
 *       The default VFS, with each commit's WAL frames written in a few calls
 *       instead of two per frame (below).
 *
 * The database handle is the first field of the sqlite3 module's Connection object
 * on CPython 3.11 to 3.13 (Modules/_sqlite/connection.h); connection.py links only
 * on those versions, and every call checks that the object is a sqlite3.Connection
 * and that it is open.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <string.h>
#include <strings.h>

typedef struct sqlite3 sqlite3;
typedef struct sqlite3_stmt sqlite3_stmt;

#define SQLITE_OK 0
#define SQLITE_ROW 100
#define SQLITE_DONE 101
#define SQLITE_PREPARE_PERSISTENT 0x01
#define SQLITE_STATIC ((void (*)(void *))0)

static struct {
    int (*prepare_v3)(sqlite3 *, const char *, int, unsigned int, sqlite3_stmt **,
                      const char **);
    int (*bind_int64)(sqlite3_stmt *, int, long long);
    int (*bind_double)(sqlite3_stmt *, int, double);
    int (*bind_text)(sqlite3_stmt *, int, const char *, int, void (*)(void *));
    int (*bind_blob)(sqlite3_stmt *, int, const void *, int, void (*)(void *));
    int (*bind_null)(sqlite3_stmt *, int);
    int (*bind_parameter_count)(sqlite3_stmt *);
    int (*step)(sqlite3_stmt *);
    int (*reset)(sqlite3_stmt *);
    int (*clear_bindings)(sqlite3_stmt *);
    int (*finalize)(sqlite3_stmt *);
    int (*changes)(sqlite3 *);
    int (*extended_errcode)(sqlite3 *);
    const char *(*errmsg)(sqlite3 *);
    const char *(*libversion)(void);
    char *(*mprintf)(const char *, ...);
    struct sqlite3_file *(*database_file_object)(const char *);
    struct sqlite3_vfs *(*vfs_find)(const char *);
    int (*vfs_register)(struct sqlite3_vfs *, int);
} api;

static PyTypeObject *connection_type; /* sqlite3.Connection, once linked */
static PyObject *ProgrammingError;     /* sqlite3.ProgrammingError */
static PyObject *Failure;             /* _sqlrun.Failure(extended_code, message) */

/* The sqlite3 module's Connection: its database handle comes first. */
typedef struct {
    PyObject_HEAD
    sqlite3 *db;
} ConnectionHead;

static sqlite3 *
handle_of(PyObject *conn)
{
    if (connection_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "relay._sqlrun is not linked");
        return NULL;
    }
    if (!PyObject_TypeCheck(conn, connection_type)) {
        PyErr_SetString(PyExc_TypeError, "expected a sqlite3.Connection");
        return NULL;
    }
    sqlite3 *db = ((ConnectionHead *)conn)->db;
    if (db == NULL) {
        PyErr_SetString(ProgrammingError, "Cannot operate on a closed database.");
    }
    return db;
}

static PyObject *
fail(sqlite3 *db, int rc)
{
    int code = db != NULL ? api.extended_errcode(db) : rc;
    const char *message = db != NULL ? api.errmsg(db) : "SQLite error";
    PyObject *args = Py_BuildValue("(is)", code, message);
    if (args != NULL) {
        PyErr_SetObject(Failure, args);
        Py_DECREF(args);
    }
    return NULL;
}

static PyObject *
link_sqlite(PyObject *self, PyObject *args)
{
    const char *path;
    PyObject *type, *programming_error;
    if (!PyArg_ParseTuple(args, "sO!O", &path, &PyType_Type, &type, &programming_error)) {
        return NULL;
    }
    /* RTLD_NOLOAD: the module is loaded already; its own dependencies are searched. */
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
    if (lib == NULL) {
        const char *why = dlerror();
        return PyErr_Format(PyExc_OSError, "%s", why != NULL ? why : "dlopen failed");
    }
    struct {
        void **slot;
        const char *name;
    } wanted[] = {
        {(void **)&api.prepare_v3, "sqlite3_prepare_v3"},
        {(void **)&api.bind_int64, "sqlite3_bind_int64"},
        {(void **)&api.bind_double, "sqlite3_bind_double"},
        {(void **)&api.bind_text, "sqlite3_bind_text"},
        {(void **)&api.bind_blob, "sqlite3_bind_blob"},
        {(void **)&api.bind_null, "sqlite3_bind_null"},
        {(void **)&api.bind_parameter_count, "sqlite3_bind_parameter_count"},
        {(void **)&api.step, "sqlite3_step"},
        {(void **)&api.reset, "sqlite3_reset"},
        {(void **)&api.clear_bindings, "sqlite3_clear_bindings"},
        {(void **)&api.finalize, "sqlite3_finalize"},
        {(void **)&api.changes, "sqlite3_changes"},
        {(void **)&api.extended_errcode, "sqlite3_extended_errcode"},
        {(void **)&api.errmsg, "sqlite3_errmsg"},
        {(void **)&api.libversion, "sqlite3_libversion"},
        {(void **)&api.mprintf, "sqlite3_mprintf"},
        {(void **)&api.database_file_object, "sqlite3_database_file_object"},
        {(void **)&api.vfs_find, "sqlite3_vfs_find"},
        {(void **)&api.vfs_register, "sqlite3_vfs_register"},
    };
    for (size_t i = 0; i < sizeof(wanted) / sizeof(wanted[0]); i++) {
        *wanted[i].slot = dlsym(lib, wanted[i].name);
        if (*wanted[i].slot == NULL) {
            memset(&api, 0, sizeof(api));
            /* The handle stays open: the sqlite3 module keeps the library loaded. */
            return PyErr_Format(PyExc_OSError, "%s not found beside %s", wanted[i].name, path);
        }
    }
    Py_INCREF(type);
    Py_XSETREF(connection_type, (PyTypeObject *)type);
    Py_INCREF(programming_error);
    Py_XSETREF(ProgrammingError, programming_error);
    return PyUnicode_FromString(api.libversion());
}

/* -- Statement ------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    sqlite3 *db;
    sqlite3_stmt *stmt;
    int params;
} Statement;

static void
Statement_dealloc(Statement *self)
{
    /* After the connection closed too: sqlite3_close_v2 waits for its statements. */
    if (self->stmt != NULL) {
        api.finalize(self->stmt);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Statement_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *conn;
    const char *sql;
    Py_ssize_t length;
    static char *keywords[] = {"connection", "sql", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Os#", keywords, &conn, &sql, &length)) {
        return NULL;
    }
    sqlite3 *db = handle_of(conn);
    if (db == NULL) {
        return NULL;
    }
    if (length > INT_MAX) {
        return PyErr_Format(PyExc_ValueError, "statement too long");
    }
    sqlite3_stmt *stmt = NULL;
    const char *tail = NULL;
    int rc = api.prepare_v3(db, sql, (int)length, SQLITE_PREPARE_PERSISTENT, &stmt, &tail);
    if (rc != SQLITE_OK) {
        return fail(db, rc);
    }
    if (stmt == NULL || (tail != NULL && *tail != '\0')) {
        api.finalize(stmt);
        return PyErr_Format(PyExc_ValueError, "expected exactly one statement");
    }
    Statement *self = (Statement *)type->tp_alloc(type, 0);
    if (self == NULL) {
        api.finalize(stmt);
        return NULL;
    }
    self->db = db;
    self->stmt = stmt;
    self->params = api.bind_parameter_count(stmt);
    return (PyObject *)self;
}

/* One value, bound in place: the caller holds a reference to it until the step is over. */
static int
bind_one(Statement *self, int index, PyObject *value)
{
    int rc;
    if (value == Py_None) {
        rc = api.bind_null(self->stmt, index);
    }
    else if (PyLong_Check(value)) {
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (overflow != 0) {
            PyErr_SetString(PyExc_OverflowError, "Python int too large to convert to SQLite INTEGER");
            return -1;
        }
        if (v == -1 && PyErr_Occurred()) {
            return -1;
        }
        rc = api.bind_int64(self->stmt, index, v);
    }
    else if (PyFloat_Check(value)) {
        rc = api.bind_double(self->stmt, index, PyFloat_AS_DOUBLE(value));
    }
    else if (PyUnicode_Check(value)) {
        Py_ssize_t size;
        const char *text = PyUnicode_AsUTF8AndSize(value, &size);
        if (text == NULL) {
            return -1;
        }
        if (size > INT_MAX) {
            PyErr_SetString(PyExc_OverflowError, "string longer than INT_MAX bytes");
            return -1;
        }
        rc = api.bind_text(self->stmt, index, text, (int)size, SQLITE_STATIC);
    }
    else if (PyBytes_Check(value)) {
        if (PyBytes_GET_SIZE(value) > INT_MAX) {
            PyErr_SetString(PyExc_OverflowError, "BLOB longer than INT_MAX bytes");
            return -1;
        }
        rc = api.bind_blob(self->stmt, index, PyBytes_AS_STRING(value),
                           (int)PyBytes_GET_SIZE(value), SQLITE_STATIC);
    }
    else {
        PyErr_Format(ProgrammingError, "Error binding parameter %d: type '%s' is not supported",
                     index, Py_TYPE(value)->tp_name);
        return -1;
    }
    if (rc != SQLITE_OK) {
        fail(self->db, rc);
        return -1;
    }
    return 0;
}

static PyObject *
Statement_run(Statement *self, PyObject *args)
{
    PyObject *conn, *values;
    Py_ssize_t start, rows, width;
    if (!PyArg_ParseTuple(args, "OO!nnn", &conn, &PyList_Type, &values, &start, &rows, &width)) {
        return NULL;
    }
    sqlite3 *db = handle_of(conn);
    if (db == NULL) {
        return NULL;
    }
    if (db != self->db) {
        PyErr_SetString(PyExc_ValueError, "the statement belongs to another connection");
        return NULL;
    }
    Py_ssize_t given = rows * width;
    if (width <= 0 || rows < 0 || start < 0 || self->params % width != 0 ||
        given > self->params || (given == 0 && self->params > 0) ||
        start + given > PyList_GET_SIZE(values)) {
        return PyErr_Format(PyExc_ValueError,
                            "%zd rows of %zd values from %zd do not fit a statement of %d "
                            "parameters over %zd values",
                            rows, width, start, self->params, PyList_GET_SIZE(values));
    }
    /* Held until the step is over: the statement reads their texts in place. */
    PyObject **held = PyMem_Malloc(sizeof(PyObject *) * (size_t)self->params);
    if (held == NULL) {
        return PyErr_NoMemory();
    }
    PyObject *result = NULL;
    int bound = 0;
    for (; bound < self->params; bound++) {
        Py_ssize_t i = bound < given ? bound : bound % width;
        PyObject *value = PyList_GET_ITEM(values, start + i);
        Py_INCREF(value);
        held[bound] = value;
        if (bind_one(self, bound + 1, value) < 0) {
            bound++;
            goto done;
        }
    }
    int rc, changes = 0;
    Py_BEGIN_ALLOW_THREADS
    do {
        rc = api.step(self->stmt);
    } while (rc == SQLITE_ROW);
    if (rc == SQLITE_DONE) {
        changes = api.changes(self->db);
    }
    Py_END_ALLOW_THREADS
    if (rc == SQLITE_DONE) {
        result = PyLong_FromLong(changes);
    }
    else {
        fail(self->db, rc); /* before reset, which clears the error's message */
    }

done:
    api.reset(self->stmt);
    api.clear_bindings(self->stmt);
    for (int i = 0; i < bound; i++) {
        Py_DECREF(held[i]);
    }
    PyMem_Free(held);
    return result;
}

static PyObject *
Statement_get_params(Statement *self, void *closure)
{
    return PyLong_FromLong(self->params);
}

static PyMethodDef Statement_methods[] = {
    {"run", (PyCFunction)Statement_run, METH_VARARGS,
     "run(connection, values, start, rows, width) -> rows changed"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Statement_getset[] = {
    {"params", (getter)Statement_get_params, NULL, "The statement's parameter count.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject StatementType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "relay._sqlrun.Statement",
    .tp_basicsize = sizeof(Statement),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A prepared multi-row statement on a sqlite3.Connection's own database handle.",
    .tp_new = Statement_new,
    .tp_dealloc = (destructor)Statement_dealloc,
    .tp_methods = Statement_methods,
    .tp_getset = Statement_getset,
};


/* -- the WAL, written a commit at a time ----------------------------------------- */

/* SQLite writes each WAL frame with two writes, its 24-byte header and its page: a
 * group of a few hundred rows dirties ~100 pages, so its COMMIT made ~200 pwrite
 * calls, the writer's largest single cost after the INSERT itself (bench/README.md,
 * "The ingest path, eighth pass"). The "relay-wal" VFS is the default VFS, except
 * that it gathers WAL writes that run on from one another and writes them at once
 * (up to 128 KiB a call) when SQLite next syncs, reads, sizes, truncates or closes
 * the WAL, or writes elsewhere in it.
 *
 * What other connections see is what the default VFS gives them, because the
 * buffer is always written before the connection lets them see or write the WAL:
 * - a commit syncs the WAL (synchronous=FULL) before it publishes its frames in the
 *   wal-index (the -shm), and the sync writes the buffer first; a write that fails
 *   is reported by that sync, which fails the commit;
 * - frames that a big transaction spilled before its COMMIT, and that a ROLLBACK then
 *   abandoned, are written when the connection gives up the WAL's write lock (an
 *   xShmLock on the main database file), as the default VFS would have written them
 *   before; else another writer's committed frames at the same offsets would be
 *   overwritten by them later (tests/test_connection.py does exactly that);
 * - and before every shm barrier, so that even a commit that did not sync could not
 *   publish a frame still in the buffer.
 * The main database file's shim finds its WAL's with sqlite3_database_file_object(),
 * and refuses any PRAGMA synchronous below FULL: the relay's acknowledgements rest
 * on every commit's sync. */

typedef long long sqlite3_int64;
typedef struct sqlite3_file sqlite3_file;
typedef struct sqlite3_io_methods sqlite3_io_methods;
typedef struct sqlite3_vfs sqlite3_vfs;

struct sqlite3_file {
    const sqlite3_io_methods *pMethods;
};

struct sqlite3_io_methods { /* sqlite3.h, version 3 */
    int iVersion;
    int (*xClose)(sqlite3_file *);
    int (*xRead)(sqlite3_file *, void *, int, sqlite3_int64);
    int (*xWrite)(sqlite3_file *, const void *, int, sqlite3_int64);
    int (*xTruncate)(sqlite3_file *, sqlite3_int64);
    int (*xSync)(sqlite3_file *, int);
    int (*xFileSize)(sqlite3_file *, sqlite3_int64 *);
    int (*xLock)(sqlite3_file *, int);
    int (*xUnlock)(sqlite3_file *, int);
    int (*xCheckReservedLock)(sqlite3_file *, int *);
    int (*xFileControl)(sqlite3_file *, int, void *);
    int (*xSectorSize)(sqlite3_file *);
    int (*xDeviceCharacteristics)(sqlite3_file *);
    int (*xShmMap)(sqlite3_file *, int, int, int, void volatile **);
    int (*xShmLock)(sqlite3_file *, int, int, int);
    void (*xShmBarrier)(sqlite3_file *);
    int (*xShmUnmap)(sqlite3_file *, int);
    int (*xFetch)(sqlite3_file *, sqlite3_int64, int, void **);
    int (*xUnfetch)(sqlite3_file *, sqlite3_int64, void *);
};

struct sqlite3_vfs { /* sqlite3.h, version 3 */
    int iVersion;
    int szOsFile;
    int mxPathname;
    sqlite3_vfs *pNext;
    const char *zName;
    void *pAppData;
    int (*xOpen)(sqlite3_vfs *, const char *, sqlite3_file *, int, int *);
    int (*xDelete)(sqlite3_vfs *, const char *, int);
    int (*xAccess)(sqlite3_vfs *, const char *, int, int *);
    int (*xFullPathname)(sqlite3_vfs *, const char *, int, char *);
    void *(*xDlOpen)(sqlite3_vfs *, const char *);
    void (*xDlError)(sqlite3_vfs *, int, char *);
    void (*(*xDlSym)(sqlite3_vfs *, void *, const char *))(void);
    void (*xDlClose)(sqlite3_vfs *, void *);
    int (*xRandomness)(sqlite3_vfs *, int, char *);
    int (*xSleep)(sqlite3_vfs *, int);
    int (*xCurrentTime)(sqlite3_vfs *, double *);
    int (*xGetLastError)(sqlite3_vfs *, int, char *);
    int (*xCurrentTimeInt64)(sqlite3_vfs *, sqlite3_int64 *);
    void *xSetSystemCall, *xGetSystemCall, *xNextSystemCall; /* version 3: not offered */
};

#define SQLITE_ERROR 1
#define SQLITE_OPEN_MAIN_DB 0x00000100
#define SQLITE_OPEN_WAL 0x00080000
#define SQLITE_FCNTL_PRAGMA 14
/* The default VFS writes at most 0x1ffff bytes a call (seekAndWriteFd masks the size
 * with it, so it must not be handed more): 31 frames of 4 KiB pages. */
#define WAL_BUFFER 0x1ffff

typedef struct ShimFile ShimFile;
struct ShimFile {
    sqlite3_file base;
    sqlite3_file *real;  /* the default VFS's file, just past this struct */
    ShimFile *partner;   /* the main database's WAL, or the WAL's main database */
    int wal;             /* 1: the WAL, whose writes are gathered */
    int used;            /* bytes waiting in buf */
    sqlite3_int64 start; /* the file offset of buf[0] */
    char *buf;
};

static sqlite3_vfs *base_vfs;
static sqlite3_vfs shim_vfs;
/* By the default VFS file's own version (1-3): SQLite calls the shm and mmap methods
 * only on files whose methods are new enough, so neither do we. */
static sqlite3_io_methods shim_methods[4];

static int
flush(ShimFile *f)
{
    if (f->used == 0) {
        return SQLITE_OK;
    }
    int used = f->used;
    f->used = 0;
    return f->real->pMethods->xWrite(f->real, f->buf, used, f->start);
}

static int
shim_write(sqlite3_file *file, const void *data, int amount, sqlite3_int64 offset)
{
    ShimFile *f = (ShimFile *)file;
    if (f->used > 0 && offset == f->start + f->used && f->used + amount <= WAL_BUFFER) {
        memcpy(f->buf + f->used, data, (size_t)amount);
        f->used += amount;
        return SQLITE_OK;
    }
    int rc = flush(f);
    if (rc != SQLITE_OK) {
        return rc;
    }
    if (f->wal && f->buf == NULL) {
        f->buf = PyMem_RawMalloc(WAL_BUFFER); /* NULL: written through, as before */
    }
    if (f->buf == NULL || amount > WAL_BUFFER / 2) {
        return f->real->pMethods->xWrite(f->real, data, amount, offset);
    }
    memcpy(f->buf, data, (size_t)amount);
    f->start = offset;
    f->used = amount;
    return SQLITE_OK;
}

static int
shim_close(sqlite3_file *file)
{
    ShimFile *f = (ShimFile *)file;
    if (f->partner != NULL) {
        f->partner->partner = NULL;
        f->partner = NULL;
    }
    int rc = flush(f);
    int closed = f->real->pMethods->xClose(f->real);
    PyMem_RawFree(f->buf);
    f->buf = NULL;
    return rc != SQLITE_OK ? rc : closed;
}

/* At least FULL: "2", "3", "full" or "extra" (pragma.c, getSafetyLevel). */
static int
syncs_every_commit(const char *level)
{
    return strcmp(level, "2") == 0 || strcmp(level, "3") == 0 ||
           strcasecmp(level, "full") == 0 || strcasecmp(level, "extra") == 0;
}

static int
shim_file_control(sqlite3_file *file, int op, void *arg)
{
    ShimFile *f = (ShimFile *)file;
    if (op == SQLITE_FCNTL_PRAGMA) {
        char **words = arg; /* [error out, name, value or NULL] */
        if (words[1] != NULL && strcasecmp(words[1], "synchronous") == 0 &&
            words[2] != NULL && !syncs_every_commit(words[2])) {
            words[0] = api.mprintf("%s", "the relay-wal VFS needs synchronous=FULL or EXTRA: "
                                         "it writes the WAL at each commit's sync");
            return SQLITE_ERROR;
        }
    }
    int rc = flush(f);
    return rc != SQLITE_OK ? rc : f->real->pMethods->xFileControl(f->real, op, arg);
}

/* Anything that reads, sizes, syncs or moves the file sees the gathered writes first. */
#define FLUSHED(call)                                                                  \
    ShimFile *f = (ShimFile *)file;                                                    \
    int rc = flush(f);                                                                 \
    return rc != SQLITE_OK ? rc : f->real->pMethods->call

static int
shim_read(sqlite3_file *file, void *data, int amount, sqlite3_int64 offset)
{
    FLUSHED(xRead(f->real, data, amount, offset));
}

static int
shim_truncate(sqlite3_file *file, sqlite3_int64 size)
{
    FLUSHED(xTruncate(f->real, size));
}

static int
shim_sync(sqlite3_file *file, int flags)
{
    FLUSHED(xSync(f->real, flags));
}

static int
shim_file_size(sqlite3_file *file, sqlite3_int64 *size)
{
    FLUSHED(xFileSize(f->real, size));
}

static int
shim_fetch(sqlite3_file *file, sqlite3_int64 offset, int amount, void **pp)
{
    FLUSHED(xFetch(f->real, offset, amount, pp));
}

#define PASSED(call)                                                                   \
    ShimFile *f = (ShimFile *)file;                                                    \
    return f->real->pMethods->call

static int
shim_lock(sqlite3_file *file, int level)
{
    PASSED(xLock(f->real, level));
}

static int
shim_unlock(sqlite3_file *file, int level)
{
    PASSED(xUnlock(f->real, level));
}

static int
shim_reserved(sqlite3_file *file, int *out)
{
    PASSED(xCheckReservedLock(f->real, out));
}

static int
shim_sector_size(sqlite3_file *file)
{
    PASSED(xSectorSize(f->real));
}

static int
shim_device(sqlite3_file *file)
{
    PASSED(xDeviceCharacteristics(f->real));
}

static int
shim_shm_map(sqlite3_file *file, int page, int size, int extend, void volatile **pp)
{
    PASSED(xShmMap(f->real, page, size, extend, pp));
}

#define SQLITE_SHM_UNLOCK 1

static int
shim_shm_lock(sqlite3_file *file, int offset, int n, int flags)
{
    ShimFile *f = (ShimFile *)file;
    if ((flags & SQLITE_SHM_UNLOCK) && f->partner != NULL) {
        /* Frames a rolled-back transaction spilled: what they were would have been
         * written already; a failure to write them loses nothing committed. */
        flush(f->partner);
    }
    return f->real->pMethods->xShmLock(f->real, offset, n, flags);
}

static void
shim_shm_barrier(sqlite3_file *file)
{
    ShimFile *f = (ShimFile *)file;
    if (f->partner != NULL) {
        flush(f->partner);
    }
    f->real->pMethods->xShmBarrier(f->real);
}

static int
shim_shm_unmap(sqlite3_file *file, int delete_flag)
{
    PASSED(xShmUnmap(f->real, delete_flag));
}

static int
shim_unfetch(sqlite3_file *file, sqlite3_int64 offset, void *p)
{
    PASSED(xUnfetch(f->real, offset, p));
}

static int
is_shim(sqlite3_file *file)
{
    return file->pMethods == &shim_methods[1] || file->pMethods == &shim_methods[2] ||
           file->pMethods == &shim_methods[3];
}

static int
vfs_open(sqlite3_vfs *vfs, const char *name, sqlite3_file *file, int flags, int *out_flags)
{
    if (!(flags & (SQLITE_OPEN_WAL | SQLITE_OPEN_MAIN_DB))) {
        /* Journals and temporary files: the default VFS's own, in place. */
        return base_vfs->xOpen(base_vfs, name, file, flags, out_flags);
    }
    ShimFile *f = (ShimFile *)file;
    memset(f, 0, sizeof(*f));
    f->real = (sqlite3_file *)(f + 1);
    int rc = base_vfs->xOpen(base_vfs, name, f->real, flags, out_flags);
    /* SQLite closes a file whose pMethods is set, even when its open failed. */
    const sqlite3_io_methods *real = f->real->pMethods;
    if (real == NULL) {
        f->base.pMethods = NULL;
        return rc;
    }
    int version = real->iVersion < 1 ? 1 : (real->iVersion > 3 ? 3 : real->iVersion);
    f->base.pMethods = &shim_methods[version];
    if (rc == SQLITE_OK && (flags & SQLITE_OPEN_WAL)) {
        /* Gathered only with the main file's shim to write them at its unlocks. */
        sqlite3_file *db = api.database_file_object(name);
        if (db != NULL && is_shim(db)) {
            f->partner = (ShimFile *)db;
            f->partner->partner = f;
            f->wal = 1;
        }
    }
    return rc;
}

/* The rest is the default VFS's, called as itself. */
static int
vfs_delete(sqlite3_vfs *vfs, const char *name, int sync_dir)
{
    return base_vfs->xDelete(base_vfs, name, sync_dir);
}

static int
vfs_access(sqlite3_vfs *vfs, const char *name, int flags, int *out)
{
    return base_vfs->xAccess(base_vfs, name, flags, out);
}

static int
vfs_full_pathname(sqlite3_vfs *vfs, const char *name, int size, char *out)
{
    return base_vfs->xFullPathname(base_vfs, name, size, out);
}

static void *
vfs_dlopen(sqlite3_vfs *vfs, const char *name)
{
    return base_vfs->xDlOpen(base_vfs, name);
}

static void
vfs_dlerror(sqlite3_vfs *vfs, int size, char *out)
{
    base_vfs->xDlError(base_vfs, size, out);
}

static void (*vfs_dlsym(sqlite3_vfs *vfs, void *handle, const char *name))(void)
{
    return base_vfs->xDlSym(base_vfs, handle, name);
}

static void
vfs_dlclose(sqlite3_vfs *vfs, void *handle)
{
    base_vfs->xDlClose(base_vfs, handle);
}

static int
vfs_randomness(sqlite3_vfs *vfs, int size, char *out)
{
    return base_vfs->xRandomness(base_vfs, size, out);
}

static int
vfs_sleep(sqlite3_vfs *vfs, int microseconds)
{
    return base_vfs->xSleep(base_vfs, microseconds);
}

static int
vfs_current_time(sqlite3_vfs *vfs, double *out)
{
    return base_vfs->xCurrentTime(base_vfs, out);
}

static int
vfs_last_error(sqlite3_vfs *vfs, int size, char *out)
{
    return base_vfs->xGetLastError(base_vfs, size, out);
}

static int
vfs_current_time64(sqlite3_vfs *vfs, sqlite3_int64 *out)
{
    return base_vfs->xCurrentTimeInt64(base_vfs, out);
}

/* Registers "relay-wal" over the default VFS, once; returns its name. */
static PyObject *
register_vfs(PyObject *self, PyObject *unused)
{
    if (api.vfs_find == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "relay._sqlrun is not linked");
        return NULL;
    }
    if (base_vfs == NULL) {
        sqlite3_vfs *base = api.vfs_find(NULL);
        if (base == NULL || base->iVersion < 2 || base->xCurrentTimeInt64 == NULL) {
            PyErr_SetString(PyExc_OSError, "the default SQLite VFS is older than version 2");
            return NULL;
        }
        shim_methods[3] = (sqlite3_io_methods){
            .iVersion = 3, .xClose = shim_close, .xRead = shim_read, .xWrite = shim_write,
            .xTruncate = shim_truncate, .xSync = shim_sync, .xFileSize = shim_file_size,
            .xLock = shim_lock, .xUnlock = shim_unlock, .xCheckReservedLock = shim_reserved,
            .xFileControl = shim_file_control, .xSectorSize = shim_sector_size,
            .xDeviceCharacteristics = shim_device, .xShmMap = shim_shm_map,
            .xShmLock = shim_shm_lock, .xShmBarrier = shim_shm_barrier,
            .xShmUnmap = shim_shm_unmap, .xFetch = shim_fetch, .xUnfetch = shim_unfetch,
        };
        for (int version = 1; version < 3; version++) {
            shim_methods[version] = shim_methods[3];
            shim_methods[version].iVersion = version;
        }
        shim_vfs = (sqlite3_vfs){
            .iVersion = 2, .szOsFile = (int)sizeof(ShimFile) + base->szOsFile,
            .mxPathname = base->mxPathname, .zName = "relay-wal", .xOpen = vfs_open,
            .xDelete = vfs_delete, .xAccess = vfs_access, .xFullPathname = vfs_full_pathname,
            .xDlOpen = vfs_dlopen, .xDlError = vfs_dlerror, .xDlSym = vfs_dlsym,
            .xDlClose = vfs_dlclose, .xRandomness = vfs_randomness, .xSleep = vfs_sleep,
            .xCurrentTime = vfs_current_time, .xGetLastError = vfs_last_error,
            .xCurrentTimeInt64 = vfs_current_time64,
        };
        base_vfs = base;
        int rc = api.vfs_register(&shim_vfs, 0);
        if (rc != SQLITE_OK) {
            base_vfs = NULL;
            return PyErr_Format(PyExc_OSError, "sqlite3_vfs_register failed: %d", rc);
        }
    }
    return PyUnicode_FromString(shim_vfs.zName);
}

static PyMethodDef methods[] = {
    {"link", link_sqlite, METH_VARARGS, "Find SQLite beside the sqlite3 module; returns its version."},
    {"register_vfs", register_vfs, METH_NOARGS, "Register the relay-wal VFS; returns its name."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "relay._sqlrun",
    .m_doc = "The outbox writer's multi-row statements, with the GIL let go once each.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__sqlrun(void)
{
    if (PyType_Ready(&StatementType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) {
        return NULL;
    }
    Failure = PyErr_NewException("relay._sqlrun.Failure", NULL, NULL);
    if (Failure == NULL || PyModule_AddObjectRef(m, "Failure", Failure) < 0 ||
        PyModule_AddObjectRef(m, "Statement", (PyObject *)&StatementType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
