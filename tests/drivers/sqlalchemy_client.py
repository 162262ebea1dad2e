"""SQLAlchemy 2 ORM (on psycopg 3) against one database: prints what each step returns, so
that the output through pgshard can be compared with the output on one plain PostgreSQL
(tests/drivers.rs).

The ORM sends what applications built on it send: its own BEGIN, executemany INSERTs,
lazy and select-in loads of relationships, parameters for LIMIT and OFFSET, aggregates with
expressions over them, server-side cursors for yield_per, and commits over several shards.
"""

import sys
from decimal import Decimal

from sqlalchemy import (
    ForeignKey,
    Numeric,
    String,
    create_engine,
    delete,
    exists,
    func,
    literal_column,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    selectinload,
)

URL = sys.argv[1]


class Base(DeclarativeBase):
    pass


class Customer(Base):
    # Sharded by id in the pgshard configuration.
    __tablename__ = "sqlalchemy_customers"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    country: Mapped[str] = mapped_column(String(2))
    orders: Mapped[list["Order"]] = relationship(back_populates="customer", order_by="Order.id")


class Order(Base):
    # Sharded by customer_id: each customer's orders live on its shard.
    __tablename__ = "sqlalchemy_orders"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    customer_id: Mapped[int] = mapped_column(ForeignKey("sqlalchemy_customers.id"))
    status: Mapped[str] = mapped_column(String(10))
    total: Mapped[Decimal] = mapped_column(Numeric(10, 2))
    customer: Mapped[Customer] = relationship(back_populates="orders")


def show(name, value):
    print(f"{name}: {value!r}")


def step(s, name, f):
    try:
        show(name, f())
    except DBAPIError as e:
        print(f"{name}: error {getattr(e.orig, 'sqlstate', None)}")
        s.rollback()


def main():
    url = "postgresql+psycopg://" + URL
    engine = create_engine(url, pool_size=3)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all(
            Customer(
                id=i,
                name=f"c{i:02}",
                country=["fr", "de", "us"][i % 3],
                orders=[
                    Order(id=i * 10 + k, status=["new", "paid", "sent"][(i + k) % 3], total=Decimal(i * 3 + k) / 4)
                    for k in range(i % 4)
                ],
            )
            for i in range(1, 31)
        )
        s.commit()

        step(s, "get", lambda: (lambda c: (c.id, c.name, [o.id for o in c.orders]))(s.get(Customer, 7)))
        step(s, "in list", lambda: s.scalars(select(Customer.name).where(Customer.id.in_([3, 14, 27, 99])).order_by(Customer.name)).all())
        step(s, "count", lambda: s.scalar(select(func.count()).select_from(Customer)))
        step(s, "page", lambda: s.scalars(select(Customer.id).order_by(Customer.name.desc()).limit(4).offset(3)).all())
        step(
            s,
            "report",
            lambda: s.execute(
                select(Customer.country, func.count(Order.id), func.coalesce(func.sum(Order.total), 0))
                .join(Order)
                .group_by(Customer.country)
                .order_by(Customer.country)
            ).all(),
        )
        step(
            s,
            "status",
            lambda: s.execute(
                select(Order.status, func.round(func.avg(Order.total), 2), func.max(Order.total) - func.min(Order.total))
                .group_by(Order.status)
                .having(func.count() > 3)
                .order_by(func.count().desc(), Order.status)
            ).all(),
        )
        step(s, "top customers", lambda: s.scalars(select(Order.customer_id).group_by(Order.customer_id).order_by(func.sum(Order.total).desc(), Order.customer_id).limit(3)).all())
        step(s, "distinct", lambda: s.scalars(select(Order.status).distinct().order_by(Order.status)).all())
        step(s, "exists", lambda: s.scalar(select(exists().where(Order.total > 20))))
        step(
            s,
            "names",
            lambda: s.scalar(select(func.string_agg(Customer.name, aggregate_order_by(literal_column("', '"), Customer.name.desc()))).where(Customer.id < 6)),
        )
        s.rollback()

        # Relationships: lazy loads (one shard each) and select-in loads (every shard).
        def loads():
            cs = s.scalars(select(Customer).where(Customer.id.in_([2, 5, 9])).order_by(Customer.id)).all()
            lazy = [(c.id, [o.total for o in c.orders]) for c in cs]
            eager = s.scalars(select(Customer).options(selectinload(Customer.orders)).where(Customer.country == "de").order_by(Customer.id)).all()
            return lazy, [(c.id, len(c.orders)) for c in eager]

        step(s, "loads", loads)
        s.rollback()

        # Changes: one shard, then two shards in one transaction (two-phase commit).
        def changes():
            c = s.get(Customer, 4)
            c.name = "renamed"
            s.flush()
            s.execute(update(Order).where(Order.customer_id == 5).values(status="paid"))
            s.execute(delete(Order).where(Order.customer_id == 7, Order.id == 71))
            s.commit()
            return (
                s.scalar(select(Customer.name).where(Customer.id == 4)),
                s.scalars(select(Order.status).where(Order.customer_id == 5).order_by(Order.id)).all(),
                s.scalar(select(func.count()).select_from(Order).where(Order.customer_id == 7)),
            )

        step(s, "changes", changes)

        def rollback():
            s.get(Customer, 10).name = "gone"
            s.get(Customer, 11).name = "gone"
            s.flush()
            s.rollback()
            return s.scalars(select(Customer.name).where(Customer.id.in_([10, 11])).order_by(Customer.id)).all()

        step(s, "rollback", rollback)
        s.rollback()

        # A server-side cursor (yield_per), over every shard.
        def streamed():
            r = s.execute(select(Order.id, Order.total).order_by(Order.total.desc(), Order.id).execution_options(yield_per=5))
            first = [tuple(row) for row in r.fetchmany(3)]
            rest = len(r.fetchall())
            s.commit()
            return first, rest

        step(s, "streamed", streamed)

        # An error inside a transaction, then the next one works.
        def failed():
            try:
                s.add(Customer(id=4, name="dup", country="fr"))
                s.flush()
            except DBAPIError as e:
                s.rollback()
                return getattr(e.orig, "sqlstate", None), s.scalar(select(func.count()).select_from(Customer))
            return "no error"

        step(s, "duplicate key", failed)
    Base.metadata.drop_all(engine)
    engine.dispose()
    print("done")


main()
