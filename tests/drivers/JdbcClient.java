// pgjdbc against one database: prints what each step returns, so that the output through
// pgshard can be compared with the output on one plain PostgreSQL (tests/drivers.rs).
// pgjdbc sends BEGIN pipelined with the first statement, server-prepares a statement from
// its fifth use (named statements), sends executeBatch as one pipelined batch, and with
// autocommit off and a fetch size reads a named portal in parts.

import java.sql.*;
import java.util.*;

public class JdbcClient {
    static final String T = "jdbc_items"; // sharded by id in the pgshard configuration

    interface Step {
        Object run() throws Exception;
    }

    static void step(String name, Step s) {
        try {
            System.out.println(name + ": " + s.run());
        } catch (SQLException e) {
            System.out.println(name + ": error " + e.getSQLState());
        } catch (Exception e) {
            System.out.println(name + ": exception " + e);
        }
    }

    static List<String> rows(ResultSet rs) throws SQLException {
        List<String> out = new ArrayList<>();
        int n = rs.getMetaData().getColumnCount();
        while (rs.next()) {
            StringBuilder b = new StringBuilder();
            for (int i = 1; i <= n; i++) {
                if (i > 1) b.append('|');
                b.append(rs.getString(i));
            }
            out.add(b.toString());
        }
        rs.close();
        return out;
    }

    public static void main(String[] args) throws Exception {
        Connection c = DriverManager.getConnection(args[0]);
        try (Statement s = c.createStatement()) {
            s.execute("DROP TABLE IF EXISTS " + T);
            s.execute("CREATE TABLE " + T + " (id bigint PRIMARY KEY, name text, amount numeric(12,2), day date)");
        }
        step("batch insert", () -> {
            try (PreparedStatement p = c.prepareStatement("INSERT INTO " + T + " (id, name, amount, day) VALUES (?, ?, ?, ?)")) {
                for (int i = 1; i <= 40; i++) {
                    p.setLong(1, i);
                    p.setString(2, "n" + i);
                    p.setBigDecimal(3, new java.math.BigDecimal(i + ".25"));
                    p.setDate(4, java.sql.Date.valueOf("2026-01-01"));
                    p.addBatch();
                }
                return Arrays.toString(p.executeBatch());
            }
        });
        step("batch with a duplicate", () -> {
            try (PreparedStatement p = c.prepareStatement("INSERT INTO " + T + " (id, name) VALUES (?, ?)")) {
                for (long id : new long[] {100, 101, 7}) {
                    p.setLong(1, id);
                    p.setString(2, "dup");
                    p.addBatch();
                }
                return Arrays.toString(p.executeBatch());
            }
        });
        step("after failed batch", () -> {
            try (Statement s = c.createStatement()) {
                return rows(s.executeQuery("SELECT count(*), sum(amount) FROM " + T));
            }
        });
        step("prepared, used 8 times", () -> {
            List<String> out = new ArrayList<>();
            try (PreparedStatement p = c.prepareStatement("SELECT name, amount FROM " + T + " WHERE id = ?")) {
                for (int i = 1; i <= 8; i++) {
                    p.setLong(1, i * 3);
                    out.addAll(rows(p.executeQuery()));
                }
            }
            return out;
        });
        step("merged, used 8 times", () -> {
            List<String> out = new ArrayList<>();
            try (PreparedStatement p = c.prepareStatement("SELECT count(*), max(amount) FROM " + T + " WHERE id > ?")) {
                for (int i = 0; i < 8; i++) {
                    p.setLong(1, i * 5);
                    out.addAll(rows(p.executeQuery()));
                }
            }
            return out;
        });
        step("ordered by numeric", () -> {
            try (PreparedStatement p = c.prepareStatement("SELECT id, amount FROM " + T + " WHERE id < ? ORDER BY amount DESC LIMIT 5")) {
                p.setLong(1, 30);
                return rows(p.executeQuery());
            }
        });
        step("limit and offset parameters (as Hibernate sends them)", () -> {
            try (PreparedStatement p = c.prepareStatement("SELECT id FROM " + T + " ORDER BY amount DESC LIMIT ? OFFSET ?")) {
                p.setInt(1, 3);
                p.setInt(2, 5);
                return rows(p.executeQuery());
            }
        });
        step("generated keys", () -> {
            try (PreparedStatement p = c.prepareStatement("INSERT INTO " + T + " (id, name) VALUES (?, ?)", Statement.RETURN_GENERATED_KEYS)) {
                p.setLong(1, 500);
                p.setString(2, "gen");
                p.executeUpdate();
                return rows(p.getGeneratedKeys());
            }
        });

        c.setAutoCommit(false);
        step("transaction reads its writes", () -> {
            try (Statement s = c.createStatement()) {
                s.executeUpdate("UPDATE " + T + " SET name = 'tx' WHERE id = 2");
                s.executeUpdate("UPDATE " + T + " SET name = 'tx' WHERE id = 3");
                return rows(s.executeQuery("SELECT id FROM " + T + " WHERE name = 'tx' ORDER BY id"));
            }
        });
        step("fetch size", () -> {
            try (PreparedStatement p = c.prepareStatement("SELECT id, name FROM " + T + " WHERE id > ? ORDER BY id")) {
                p.setFetchSize(7);
                p.setLong(1, 20);
                return rows(p.executeQuery());
            }
        });
        step("batch update in transaction", () -> {
            try (PreparedStatement p = c.prepareStatement("UPDATE " + T + " SET amount = amount + 1 WHERE id = ?")) {
                for (int i = 1; i <= 6; i++) {
                    p.setLong(1, i);
                    p.addBatch();
                }
                return Arrays.toString(p.executeBatch());
            }
        });
        step("rollback", () -> {
            c.rollback();
            return "ok";
        });
        step("rolled back", () -> {
            try (Statement s = c.createStatement()) {
                return rows(s.executeQuery("SELECT count(*), sum(amount) FROM " + T + " WHERE name = 'tx' OR id <= 6"));
            }
        });
        step("error in transaction", () -> {
            try (Statement s = c.createStatement()) {
                s.executeQuery("SELECT 1 / (id - id) FROM " + T);
                return "no error";
            } catch (SQLException e) {
                String first = e.getSQLState();
                String second;
                try (Statement s = c.createStatement()) {
                    s.executeQuery("SELECT 1");
                    second = "ran";
                } catch (SQLException e2) {
                    second = e2.getSQLState();
                }
                c.rollback();
                return first + " " + second;
            }
        });
        step("commit", () -> {
            try (Statement s = c.createStatement()) {
                s.executeUpdate("UPDATE " + T + " SET name = 'committed' WHERE id IN (1, 2)");
            }
            c.commit();
            return "ok";
        });
        c.setAutoCommit(true);
        step("committed", () -> {
            try (Statement s = c.createStatement()) {
                return rows(s.executeQuery("SELECT id FROM " + T + " WHERE name = 'committed' ORDER BY id"));
            }
        });
        step("metadata", () -> {
            List<String> out = new ArrayList<>();
            try (ResultSet rs = c.getMetaData().getColumns(null, "public", T, "%")) {
                while (rs.next()) out.add(rs.getString("COLUMN_NAME") + " " + rs.getString("TYPE_NAME"));
            }
            return out;
        });
        // After an error in a transaction over both shards: 25P02, and COMMIT ends it (as
        // a rollback) instead of waiting forever.
        c.setAutoCommit(false);
        step("commit after an error", () -> {
            List<String> out = new ArrayList<>();
            try (Statement s = c.createStatement()) {
                s.executeUpdate("UPDATE " + T + " SET name = 'lost' WHERE id = 5");
                out.addAll(rows(s.executeQuery("SELECT count(*) FROM " + T)));
                for (String q : new String[] {"SELECT 1 / 0", "SELECT 1"}) {
                    try {
                        s.executeQuery(q);
                    } catch (SQLException e) {
                        out.add(e.getSQLState());
                    }
                }
            }
            c.commit();
            return out;
        });
        c.setAutoCommit(true);
        step("lost", () -> {
            try (Statement s = c.createStatement()) {
                return rows(s.executeQuery("SELECT count(*) FROM " + T + " WHERE name = 'lost'"));
            }
        });
        // autosave=always: a savepoint before each statement, rolled back to after an
        // error, pipelined with the next statement; the transaction goes on.
        try (Connection a = DriverManager.getConnection(args[0] + "&autosave=always")) {
            a.setAutoCommit(false);
            step("autosave", () -> {
                List<String> out = new ArrayList<>();
                try (Statement s = a.createStatement()) {
                    s.executeUpdate("UPDATE " + T + " SET name = 'kept' WHERE id = 6");
                    out.addAll(rows(s.executeQuery("SELECT count(*) FROM " + T + " WHERE id > 3")));
                    try {
                        s.executeQuery("SELECT 1 / 0");
                    } catch (SQLException e) {
                        out.add(e.getSQLState());
                    }
                    s.executeUpdate("UPDATE " + T + " SET name = 'kept' WHERE id = 7");
                    out.addAll(rows(s.executeQuery("SELECT id FROM " + T + " WHERE name = 'kept' ORDER BY id")));
                }
                a.commit();
                return out;
            });
        }
        step("kept", () -> {
            try (Statement s = c.createStatement()) {
                return rows(s.executeQuery("SELECT id FROM " + T + " WHERE name = 'kept' ORDER BY id"));
            }
        });
        try (Statement s = c.createStatement()) {
            s.execute("DROP TABLE " + T);
        }
        c.close();
        System.out.println("done");
    }
}
