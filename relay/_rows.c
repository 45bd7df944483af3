/* The webhook's hot path in C: a documented Frotcom body's outbox rows.
 *
 * relay/frotcom.py decodes a body of the documented shape with msgspec (types and
 * ranges checked in C) and relay/outbox/batch.py turns its positions into outbox
 * rows. In Python that second part costs ~3 us per position on the event loop, with
 * the GIL held, and the GIL is what the outbox writer's thread waits for (see
 * bench/README.md, "The ingest path, sixth pass"). These two functions do the same
 * work without a Python object per position beyond the row's own values:
 *
 *   scan(messages, now_ms, max_future_ms) -> int | None
 *       The number of positions when every Timestamp is in the relay's canonical
 *       form (YYYY-MM-DDTHH:MM:SS.mmmZ, a real date) and not beyond the future
 *       bound; None otherwise (the Python code then decides, as before).
 *
 *   rows(messages, texts, vehicle_ids, ranks, provider, received_at, vehicles)
 *       -> list[(vehicle_id, held, moments, rows, values, steady)] | None
 *       What BatchJob builds per vehicle, in the same order with the same values;
 *       None when a value could not be written exactly as orjson would write it
 *       (text that needs escaping, a float outside [1e-4, 1e16)), and the Python
 *       code builds the rows instead.
 *
 * Both only ever take a subset of what the Python code takes and give the same
 * answer on it; tests/test_rows.py holds them to that.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>
#include <string.h>

static PyObject *s_Timestamp, *s_Latitude, *s_Longitude, *s_Speed, *s_Ignition, *s_Odometer,
    *s_Positions, *s_PERIODIC, *s_held, *s_pending;

/* -- timestamps ------------------------------------------------------------------ */

static int
digits(const char *s, int n, int *out)
{
    int v = 0;
    for (int i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') {
            return -1;
        }
        v = v * 10 + (s[i] - '0');
    }
    *out = v;
    return 0;
}

static int
days_in_month(int y, int m)
{
    static const int dim[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (m == 2 && (y % 4 == 0 && (y % 100 != 0 || y % 400 == 0))) {
        return 29;
    }
    return dim[m - 1];
}

/* Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's days_from_civil). */
static long long
days_from_civil(long long y, int m, int d)
{
    y -= m <= 2;
    long long era = (y >= 0 ? y : y - 399) / 400;
    long long yoe = y - era * 400;
    long long doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
    long long doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

/* Epoch milliseconds of a canonical timestamp; -1 if the text is not one. Only what
 * datetime.fromisoformat reads with every field in range: timeutil.parse_instant's
 * fast path. */
static int
canonical_ms(PyObject *text, long long *out)
{
    Py_ssize_t n;
    if (!PyUnicode_Check(text) || !PyUnicode_IS_ASCII(text)) {
        return -1;
    }
    n = PyUnicode_GET_LENGTH(text);
    if (n != 24) {
        return -1;
    }
    const char *s = (const char *)PyUnicode_DATA(text);
    int y, mo, d, h, mi, se, ms;
    if (s[4] != '-' || s[7] != '-' || s[10] != 'T' || s[13] != ':' || s[16] != ':' ||
        s[19] != '.' || s[23] != 'Z') {
        return -1;
    }
    if (digits(s, 4, &y) || digits(s + 5, 2, &mo) || digits(s + 8, 2, &d) ||
        digits(s + 11, 2, &h) || digits(s + 14, 2, &mi) || digits(s + 17, 2, &se) ||
        digits(s + 20, 3, &ms)) {
        return -1;
    }
    if (y < 1 || mo < 1 || mo > 12 || d < 1 || d > days_in_month(y, mo) || h > 23 || mi > 59 ||
        se > 59) {
        return -1;
    }
    *out = days_from_civil(y, mo, d) * 86400000LL + h * 3600000LL + mi * 60000LL +
           se * 1000LL + ms;
    return 0;
}

static PyObject *
positions_of(PyObject *message)
{
    /* New reference to message.Positions, which msgspec made a list. */
    PyObject *positions = PyObject_GetAttr(message, s_Positions);
    if (positions != NULL && !PyList_Check(positions)) {
        Py_DECREF(positions);
        PyErr_SetString(PyExc_TypeError, "Positions is not a list");
        return NULL;
    }
    return positions;
}

static PyObject *
scan(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *messages;
    long long now_ms, max_future_ms;
    if (!PyArg_ParseTuple(args, "O!LL:scan", &PyList_Type, &messages, &now_ms,
                          &max_future_ms)) {
        return NULL;
    }
    Py_ssize_t count = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(messages); i++) {
        PyObject *positions = positions_of(PyList_GET_ITEM(messages, i));
        if (positions == NULL) {
            return NULL;
        }
        for (Py_ssize_t j = 0; j < PyList_GET_SIZE(positions); j++) {
            PyObject *stamp = PyObject_GetAttr(PyList_GET_ITEM(positions, j), s_Timestamp);
            if (stamp == NULL) {
                Py_DECREF(positions);
                return NULL;
            }
            long long ms;
            int ok = canonical_ms(stamp, &ms) == 0 && ms - now_ms <= max_future_ms;
            Py_DECREF(stamp);
            if (!ok) {
                Py_DECREF(positions);
                Py_RETURN_NONE;
            }
            count++;
        }
        Py_DECREF(positions);
    }
    return PyLong_FromSsize_t(count);
}

/* -- JSON text ------------------------------------------------------------------- */

typedef struct {
    char *p;
    char *end;
} Out;

static int
put(Out *o, const char *s, size_t n)
{
    if ((size_t)(o->end - o->p) < n) {
        return -1;
    }
    memcpy(o->p, s, n);
    o->p += n;
    return 0;
}

#define PUT(o, lit) put((o), (lit), sizeof(lit) - 1)

/* Text that goes into a JSON string as it is: printable ASCII without '"' or '\'. */
static int
plain_text(PyObject *text, const char **s, Py_ssize_t *n)
{
    if (!PyUnicode_Check(text) || !PyUnicode_IS_ASCII(text)) {
        return -1;
    }
    *s = (const char *)PyUnicode_DATA(text);
    *n = PyUnicode_GET_LENGTH(text);
    for (Py_ssize_t i = 0; i < *n; i++) {
        char c = (*s)[i];
        if (c < 0x20 || c > 0x7e || c == '"' || c == '\\') {
            return -1;
        }
    }
    return 0;
}

/* A float as orjson writes it. repr's shortest round-trip digits are orjson's too; the
 * two spell exponents alike only between 1e-4 and 1e16 (repr writes 1e-05, orjson
 * 0.00001), so anything else is left to orjson. */
static int
put_float(Out *o, PyObject *value)
{
    if (!PyFloat_CheckExact(value)) {
        return -1;
    }
    double v = PyFloat_AS_DOUBLE(value);
    double a = v < 0 ? -v : v;
    if (!(a == 0.0 || (a >= 1e-4 && a < 1e16))) {
        return -1;
    }
    char *text = PyOS_double_to_string(v, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (text == NULL) {
        PyErr_Clear();
        return -1;
    }
    int rc = put(o, text, strlen(text));
    PyMem_Free(text);
    return rc;
}

/* -- rows -------------------------------------------------------------------------- */

typedef struct {
    long long ts_ms;
    Py_ssize_t rank;     /* the vehicle's place in sorted VehicleID order */
    Py_ssize_t message;  /* which message it came in */
    Py_ssize_t seq;      /* input order: keeps the sort stable, as Python's is */
    PyObject *position;  /* borrowed from its message's Positions list */
    PyObject *raw;       /* its text, borrowed from the same message's raw Positions */
} Record;

static int
by_vehicle_then_time(const void *a, const void *b)
{
    const Record *x = a, *y = b;
    if (x->rank != y->rank) {
        return x->rank < y->rank ? -1 : 1;
    }
    if (x->ts_ms != y->ts_ms) {
        return x->ts_ms < y->ts_ms ? -1 : 1;
    }
    return x->seq < y->seq ? -1 : (x->seq > y->seq);
}

/* One position's row: a new tuple of the ten INSERT values, or NULL with an error set,
 * or Py_None (borrowed) when its payload cannot be written here. */
static PyObject *
make_row(PyObject *position, PyObject *raw, PyObject *vehicle_id, PyObject *status,
         PyObject *provider, PyObject *received_at, Out *buffer, PyObject **ignition_out)
{
    PyObject *row = NULL, *stamp = NULL, *lat = NULL, *lon = NULL, *speed = NULL,
             *ignition = NULL, *odometer = NULL, *event_id = NULL, *payload = NULL,
             *source = NULL;
    const char *ps, *vs, *ts, *rs;
    Py_ssize_t pn, vn, tn, rn;
    Py_buffer view = {0};
    Out o = *buffer;

    stamp = PyObject_GetAttr(position, s_Timestamp);
    lat = stamp ? PyObject_GetAttr(position, s_Latitude) : NULL;
    lon = lat ? PyObject_GetAttr(position, s_Longitude) : NULL;
    speed = lon ? PyObject_GetAttr(position, s_Speed) : NULL;
    ignition = speed ? PyObject_GetAttr(position, s_Ignition) : NULL;
    odometer = ignition ? PyObject_GetAttr(position, s_Odometer) : NULL;
    if (odometer == NULL) {
        goto error;
    }
    if (plain_text(provider, &ps, &pn) || plain_text(vehicle_id, &vs, &vn) ||
        plain_text(stamp, &ts, &tn) || plain_text(received_at, &rs, &rn) ||
        (ignition != Py_True && ignition != Py_False)) {
        goto unwritable;
    }
    if (put(&o, ps, pn) || PUT(&o, ":") || put(&o, vs, vn) || PUT(&o, ":") || put(&o, ts, tn)) {
        goto unwritable;
    }
    event_id = PyUnicode_FromStringAndSize(buffer->p, o.p - buffer->p);
    if (event_id == NULL) {
        goto error;
    }
    /* relay.mapping.build_event's dict, key for key, as orjson writes it. */
    o = *buffer;
    if (PUT(&o, "{\"event_type\":\"PERIODIC\",\"event_ts\":\"") || put(&o, ts, tn) ||
        PUT(&o, "\",\"source\":{\"provider\":\"") || put(&o, ps, pn) ||
        PUT(&o, "\",\"device_id\":\"") || put(&o, vs, vn) ||
        PUT(&o, "\",\"provider_event_id\":\"") || put(&o, ps, pn) || PUT(&o, ":") ||
        put(&o, vs, vn) || PUT(&o, ":") || put(&o, ts, tn) ||
        PUT(&o, "\",\"provider_received_ts\":\"") || put(&o, rs, rn) ||
        PUT(&o, "\"},\"position\":{\"latitude\":") || put_float(&o, lat) ||
        PUT(&o, ",\"longitude\":") || put_float(&o, lon) || PUT(&o, "}")) {
        goto unwritable;
    }
    if (odometer != Py_None) {
        if (PUT(&o, ",\"telemetry\":{\"speed\":") || put_float(&o, speed) ||
            PUT(&o, ",\"ignition\":") ||
            (ignition == Py_True ? PUT(&o, "true") : PUT(&o, "false")) ||
            PUT(&o, ",\"odometer\":") || put_float(&o, odometer) || PUT(&o, "}")) {
            goto unwritable;
        }
    }
    if (PUT(&o, "}")) {
        goto unwritable;
    }
    payload = PyUnicode_FromStringAndSize(buffer->p, o.p - buffer->p);
    if (payload == NULL) {
        goto error;
    }
    /* The position's text as Frotcom sent it: msgspec.Raw is valid UTF-8 JSON. */
    if (PyObject_GetBuffer(raw, &view, PyBUF_SIMPLE) < 0) {
        goto error;
    }
    source = PyUnicode_DecodeUTF8((const char *)view.buf, view.len, NULL);
    PyBuffer_Release(&view);
    if (source == NULL) {
        goto error;
    }
    /* next_attempt_at: the event's own time if it lies ahead, as in BatchJob. */
    int ahead = PyUnicode_Compare(stamp, received_at) > 0;
    row = PyTuple_New(10);
    if (row == NULL) {
        goto error;
    }
    PyObject *due = ahead ? stamp : received_at;
    PyObject *values[10] = {event_id, vehicle_id, stamp, s_PERIODIC, status,
                            due, received_at, received_at, payload, source};
    for (int k = 0; k < 10; k++) {
        if (k != 0 && k != 8 && k != 9) {
            Py_INCREF(values[k]);
        }
        PyTuple_SET_ITEM(row, k, values[k]);
    }
    *ignition_out = ignition; /* borrowed: True or False outlive the row */
    Py_DECREF(stamp);
    Py_DECREF(lat);
    Py_DECREF(lon);
    Py_DECREF(speed);
    Py_DECREF(ignition);
    Py_DECREF(odometer);
    return row;

unwritable:
    row = Py_None;
error:
    Py_XDECREF(stamp);
    Py_XDECREF(lat);
    Py_XDECREF(lon);
    Py_XDECREF(speed);
    Py_XDECREF(ignition);
    Py_XDECREF(odometer);
    Py_XDECREF(event_id);
    Py_XDECREF(payload);
    Py_XDECREF(source);
    return row;
}

/* One vehicle's (vehicle_id, held, moments, rows, values, steady) from its records. */
static PyObject *
vehicle_group(Record *first, Py_ssize_t n, PyObject *vehicle_ids, PyObject *provider,
              PyObject *received_at, PyObject *vehicles, Out *buffer)
{
    PyObject *vehicle_id = PyList_GET_ITEM(vehicle_ids, first->message);
    int known = PySequence_Contains(vehicles, vehicle_id);
    if (known < 0) {
        return NULL;
    }
    PyObject *status = known ? s_pending : s_held;
    PyObject *moments = PyList_New(n), *rows = PyList_New(n), *values = PyList_New(n * 10);
    PyObject *result = NULL, *first_ignition = NULL;
    int steady = 1;
    if (moments == NULL || rows == NULL || values == NULL) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        Record *r = &first[i];
        PyObject *ignition = NULL;
        PyObject *row = make_row(r->position, r->raw, vehicle_id, status, provider, received_at,
                                 buffer, &ignition);
        if (row == NULL) {
            goto done;
        }
        if (row == Py_None) {
            result = Py_None;
            Py_INCREF(result);
            goto done;
        }
        PyList_SET_ITEM(rows, i, row);
        for (int k = 0; k < 10; k++) {
            PyObject *v = PyTuple_GET_ITEM(row, k);
            Py_INCREF(v);
            PyList_SET_ITEM(values, i * 10 + k, v);
        }
        if (i == 0) {
            first_ignition = ignition;
        }
        else if (ignition != first_ignition || r[-1].ts_ms >= r->ts_ms) {
            steady = 0;
        }
        PyObject *moment = Py_BuildValue("(LO)", r->ts_ms, ignition);
        if (moment == NULL) {
            goto done;
        }
        PyList_SET_ITEM(moments, i, moment);
    }
    result = Py_BuildValue("(OOOOOO)", vehicle_id, known ? Py_False : Py_True, moments, rows,
                           values, steady ? Py_True : Py_False);
done:
    /* A list filled only part way holds NULLs, which Py_DECREF of a list allows. */
    Py_XDECREF(moments);
    Py_XDECREF(rows);
    Py_XDECREF(values);
    return result;
}

static PyObject *
rows(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *messages, *texts, *vehicle_ids, *ranks, *provider, *received_at, *vehicles;
    if (!PyArg_ParseTuple(args, "O!O!O!O!UUO:rows", &PyList_Type, &messages, &PyList_Type,
                          &texts, &PyList_Type, &vehicle_ids, &PyList_Type, &ranks, &provider,
                          &received_at, &vehicles)) {
        return NULL;
    }
    Py_ssize_t nmessages = PyList_GET_SIZE(messages);
    if (PyList_GET_SIZE(texts) != nmessages || PyList_GET_SIZE(vehicle_ids) != nmessages ||
        PyList_GET_SIZE(ranks) != nmessages) {
        PyErr_SetString(PyExc_ValueError, "messages, texts, vehicle_ids and ranks differ in length");
        return NULL;
    }
    /* Each message's Positions and raw Positions, fetched once: new references, held
     * until the rows are built, so the records may borrow their items. */
    PyObject **lists = PyMem_Calloc(2 * (nmessages ? nmessages : 1), sizeof(PyObject *));
    Record *records = NULL;
    char *text = NULL;
    PyObject *result = NULL;
    if (lists == NULL) {
        return PyErr_NoMemory();
    }
    Py_ssize_t total = 0, longest_id = 0;
    for (Py_ssize_t i = 0; i < nmessages; i++) {
        PyObject *vehicle_id = PyList_GET_ITEM(vehicle_ids, i);
        if (!PyUnicode_Check(vehicle_id)) {
            PyErr_SetString(PyExc_TypeError, "a vehicle id is not text");
            goto done;
        }
        if (PyUnicode_GET_LENGTH(vehicle_id) > longest_id) {
            longest_id = PyUnicode_GET_LENGTH(vehicle_id);
        }
        lists[2 * i] = positions_of(PyList_GET_ITEM(messages, i));
        if (lists[2 * i] == NULL) {
            goto done;
        }
        lists[2 * i + 1] = positions_of(PyList_GET_ITEM(texts, i));
        if (lists[2 * i + 1] == NULL) {
            goto done;
        }
        if (PyList_GET_SIZE(lists[2 * i]) != PyList_GET_SIZE(lists[2 * i + 1])) {
            PyErr_SetString(PyExc_ValueError, "texts do not match the positions");
            goto done;
        }
        total += PyList_GET_SIZE(lists[2 * i]);
    }
    records = PyMem_Calloc(total ? total : 1, sizeof(Record));
    /* The longest payload: its fixed text, the ids twice, four floats of <= 32 chars. */
    size_t size = 512 + 2 * (size_t)PyUnicode_GET_LENGTH(provider) + 2 * (size_t)longest_id;
    text = PyMem_Malloc(size);
    if (records == NULL || text == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i < nmessages; i++) {
        Py_ssize_t rank = PyLong_AsSsize_t(PyList_GET_ITEM(ranks, i));
        if (rank == -1 && PyErr_Occurred()) {
            goto done;
        }
        PyObject *positions = lists[2 * i], *raws = lists[2 * i + 1];
        for (Py_ssize_t j = 0; j < PyList_GET_SIZE(positions); j++, k++) {
            PyObject *stamp = PyObject_GetAttr(PyList_GET_ITEM(positions, j), s_Timestamp);
            if (stamp == NULL) {
                goto done;
            }
            int bad = canonical_ms(stamp, &records[k].ts_ms);
            Py_DECREF(stamp);
            if (bad) {
                result = Py_None;
                Py_INCREF(result);
                goto done;
            }
            records[k].rank = rank;
            records[k].message = i;
            records[k].seq = k;
            records[k].position = PyList_GET_ITEM(positions, j);
            records[k].raw = PyList_GET_ITEM(raws, j);
        }
    }
    qsort(records, total, sizeof(Record), by_vehicle_then_time);
    result = PyList_New(0);
    if (result == NULL) {
        goto done;
    }
    Out buffer = {text, text + size};
    for (Py_ssize_t start = 0; start < total;) {
        Py_ssize_t end = start + 1;
        while (end < total && records[end].rank == records[start].rank) {
            end++;
        }
        PyObject *group = vehicle_group(&records[start], end - start, vehicle_ids, provider,
                                        received_at, vehicles, &buffer);
        if (group == NULL || group == Py_None || PyList_Append(result, group) < 0) {
            Py_CLEAR(result);
            if (group == Py_None) {
                result = group;
            }
            else {
                Py_XDECREF(group);
            }
            goto done;
        }
        Py_DECREF(group);
        start = end;
    }
done:
    for (Py_ssize_t i = 0; i < 2 * nmessages; i++) {
        Py_XDECREF(lists[i]);
    }
    PyMem_Free(lists);
    PyMem_Free(records);
    PyMem_Free(text);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, "The number of positions if every timestamp is canonical."},
    {"rows", rows, METH_VARARGS, "Each vehicle's outbox rows, or None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "relay._rows",
    .m_doc = "Outbox rows of a documented Frotcom body, in C.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__rows(void)
{
    struct {
        PyObject **slot;
        const char *text;
    } names[] = {
        {&s_Timestamp, "Timestamp"}, {&s_Latitude, "Latitude"}, {&s_Longitude, "Longitude"},
        {&s_Speed, "Speed"},         {&s_Ignition, "Ignition"}, {&s_Odometer, "Odometer"},
        {&s_Positions, "Positions"}, {&s_PERIODIC, "PERIODIC"}, {&s_held, "held"},
        {&s_pending, "pending"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        *names[i].slot = PyUnicode_InternFromString(names[i].text);
        if (*names[i].slot == NULL) {
            return NULL;
        }
    }
    return PyModule_Create(&module);
}
